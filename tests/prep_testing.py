"""Helpers shared by the data_prep tests: run the CLI in a subprocess and check its errors."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_prep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m data_prep ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 1, nothing on stdout, one line on stderr holding each fragment, no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], proc.stderr
