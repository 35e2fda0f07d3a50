"""install.sh: what it refuses before it installs anything (a copy of the script in an empty folder, a stand-in df)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prep_testing import REPO


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _install(tmp_path: Path, *args: str, free_kb: int) -> subprocess.CompletedProcess:
    """Runs a copy of install.sh where `df` reports `free_kb` KiB free on /data and dpkg finds every package."""
    shutil.copy(REPO / "install.sh", tmp_path / "install.sh")
    bin_dir = tmp_path / "bin"
    header = "Filesystem 1024-blocks Used Available Capacity Mounted on"
    _script(bin_dir / "df", f"echo '{header}'; echo '/dev/vdb 300000000 200000000 {free_kb} 90% /data'")
    _script(bin_dir / "dpkg", "exit 0")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(tmp_path / "install.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("args, venv", [((), ".venv"), (("--dev", "--gpu-machine"), ".venv-gpu-machine")])
def test_a_new_environment_is_refused_up_front_on_a_disk_without_room_for_it(tmp_path, args, venv):
    proc = _install(tmp_path, *args, free_kb=3 * 1024 * 1024)
    assert proc.returncode == 1 and proc.stdout == ""  # before apt and pip
    assert proc.stderr.startswith(f"install.sh: {venv} needs about 10 GB of free disk, and /data has 3 GB free")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / venv).exists()


def test_an_existing_environment_is_updated_whatever_the_free_disk(tmp_path):
    calls = tmp_path / "calls"
    _script(tmp_path / ".venv" / "bin" / "python", f'echo "$*" >> {calls}')  # records what pip is asked
    proc = _install(tmp_path, "--dev", free_kb=1024)
    assert proc.returncode == 0, proc.stderr
    pip = calls.read_text().splitlines()
    assert pip[:2] == ["-m pip install -q -U pip", "-m pip install -q -c requirements/tested.txt -e .[dev]"]


def test_unknown_options_are_a_usage_error(tmp_path):
    proc = _install(tmp_path, "--gpu", free_kb=100 * 1024 * 1024)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash install.sh")
