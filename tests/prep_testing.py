"""Helpers shared by the data_prep tests: run the CLI in a subprocess and check its errors."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_prep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m data_prep ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> None:
    """Exit status 1 (2: a usage error), nothing on stdout, one line on stderr holding each fragment, no traceback."""
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], proc.stderr


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-frequency content: JPEG and resampling errors stay small, so pixel comparisons can be tight."""
    coarse = rng.uniform(0, 255, size=(3, 3, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped): no process of that pid runs now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _as_a_foreground_job() -> None:
    """Ctrl-C's default action, as a terminal's foreground job has it: a test run started in the background
    (`cmd &` in a script) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_conversion(src: Path, dst: Path, *args: str) -> subprocess.Popen:
    """`convert SRC DST ARGS` in a subprocess of its own process group, returned once it is writing."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", "convert", str(src), str(dst), "--workers", "2", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as a shell job
        preexec_fn=_as_a_foreground_job,
    )
    deadline = time.monotonic() + 60
    while not list(dst.parent.glob("*.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # workers busy, pages being written
    assert proc.poll() is None, proc.stderr.read()
    return proc


def assert_nothing_left(proc: subprocess.Popen, dst: Path) -> None:
    assert list(dst.parent.iterdir()) == []  # no DST, no temporary file, no class list or report
    deadline = time.monotonic() + 10
    while processes_mentioning(str(dst)) and time.monotonic() < deadline:  # workers share the command line
        time.sleep(0.1)
    assert processes_mentioning(str(dst)) == []
