"""train.py: the command line, SIGTERM -> checkpoint -> exit, and torchrun with 2 gloo processes = 1 process."""

import contextlib
import errno
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from _fixtures import write_beton
from mugs_testing import free_port, small_cfg, start, torchrun

from mugs_fast import checkpoint
from mugs_fast import engine as train_cli
from mugs_fast.checkpoint import load_checkpoint
from mugs_fast.config import MugsConfig
from mugs_fast.engine import build_model, train
from mugs_fast.runtime import RunLock


def _flags(cfg: MugsConfig) -> list[str]:
    """Command-line flags giving `cfg` (every field that differs from the defaults)."""
    default, out = MugsConfig().to_dict(), []
    for key, value in cfg.to_dict().items():
        if value != default[key] and key != "recipe":
            values = value if isinstance(value, list) else [value]
            out += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return out


def _synthetic_cfg(out: Path, **overrides) -> MugsConfig:
    base = dict(synthetic=True, output_dir=str(out), drop_path_rate=0.0, warmup_epochs=0, epochs=1, log_freq=1)
    return small_cfg(**{**base, **overrides})


def test_flags_round_trip():
    cfg = _synthetic_cfg(Path("x"))
    assert train_cli.parse_config(_flags(cfg)) == cfg.replace(recipe="")


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    assert train_cli.main(["--output_dir", str(tmp_path), "--data_path", str(tmp_path / "nope.beton")]) == 1
    err = capsys.readouterr().err
    assert err == f"mugs-train: error: --data_path {tmp_path / 'nope.beton'}: no such file\n"
    assert train_cli.main(["--output_dir", str(tmp_path)]) == 1
    assert "either --data_path" in capsys.readouterr().err


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--no_such_flag", "1"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "run", max_steps=10_000)
    proc = start([sys.executable, "train.py", *_flags(cfg)])
    try:
        for line in proc.stdout:  # wait for training to be under way
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped (SIGTERM)" in stdout
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert 2 <= ckpt["step"] < 10_000 and ckpt["loader"]["position"] == ckpt["step"]


def _assert_entries_close(a: dict, b: dict, entries: tuple[str, ...], atol: float) -> None:
    for entry in entries:
        for key, value in b[entry].items():
            name = f"{entry} {key}"
            torch.testing.assert_close(
                a[entry][key], value, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
            )


def test_two_gloo_processes_equal_one_process(tmp_path):
    # SGD, not AdamW: weights whose gradient is zero in exact arithmetic (the attention key biases: softmax ignores
    # them) get float-noise gradients that differ with the reduction order; Adam's first steps scale any gradient to
    # about lr, SGD keeps noise at noise. A large lr and a fast teacher move the teacher well beyond the tolerance.
    steps, fast = 3, dict(optimizer="sgd", lr=2.0, momentum_teacher=0.9)
    two = _synthetic_cfg(tmp_path / "two", batch_size_per_gpu=3, max_steps=steps, **fast)
    proc = start([*torchrun(2), "train.py", *_flags(two)])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "global batch 6 on 2 process(es)" in stdout

    one = _synthetic_cfg(tmp_path / "one", batch_size_per_gpu=6, max_steps=steps, **fast)
    train(one)
    a, b = load_checkpoint(tmp_path / "two" / "checkpoint.pth"), load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    assert len(a["rng"]) == 2 and a["step"] == b["step"] == steps
    entries = ("student", "teacher", "teacher_mem", "student_mem", "instance-sup.", "local-group-sup.", "group-sup.")
    _assert_entries_close(a, b, entries, atol=1e-5)
    initial = build_model(one, torch.device("cpu")).teacher.state_dict()["backbone.blocks.0.attn.qkv.weight"]
    assert (b["teacher"]["backbone.blocks.0.attn.qkv.weight"] - initial).abs().max() > 1e-3


def _wait_for_step(stdout, step: int) -> None:
    for line in stdout:  # the main process prints a metrics line per step (log_freq 1)
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}")


def _read_to_end(stream, timeout: float) -> str | None:
    """Everything left in `stream`, or None when it is still open after `timeout` seconds."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(stream.read()), daemon=True)
    reader.start()
    reader.join(timeout)
    return None if reader.is_alive() else out[0]


def test_a_worker_stops_when_its_torchrun_agent_dies(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "run", max_steps=10_000)
    agent = start([*torchrun(1), "train.py", *_flags(cfg)])
    worker = None
    try:
        _wait_for_step(agent.stdout, 2)
        worker = int((tmp_path / "run" / "run.lock").read_text().split()[1])  # "pid N on HOST"
        agent.kill()  # as a cluster requeueing the job may do: the worker, which shares our pipes, is orphaned
        agent.wait()
        rest = _read_to_end(agent.stdout, timeout=120)  # the end of the pipe: the worker has exited
    finally:
        agent.kill()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    assert rest is not None, "the orphaned worker is still training"
    assert "stopped (SIGTERM)" in rest  # as on preemption: the step finished, a checkpoint written
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] >= 2
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() is None  # and the run directory is free for the requeued job
    lock.release()


# 24 s: long enough that a slow start of one process on a loaded machine is not taken for a frozen rank
# rank 1 frozen: rank 0 finds it through the rendezvous store; rank 0 frozen: the store it hosts is silent too
@pytest.mark.parametrize("frozen", [1, 0])
def test_a_frozen_rank_is_named_when_a_collective_times_out(tmp_path, frozen):
    cfg = _synthetic_cfg(tmp_path / "run", max_steps=10_000, collective_timeout_minutes=0.4)
    env = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [start([sys.executable, "train.py", *_flags(cfg)], env={**env, "RANK": r, "LOCAL_RANK": r}) for r in "01"]
    alive = 1 - frozen
    try:
        _wait_for_step(ranks[0].stdout, 2)
        os.kill(ranks[frozen].pid, signal.SIGSTOP)  # frozen: alive, holding its connections, silent
        _, stderr = ranks[alive].communicate(timeout=180)
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[alive].returncode == 1, stderr[-3000:]
    error = stderr.rsplit("\r", 1)[-1].splitlines()[-1]  # after the progress bar
    expected = f"mugs-train: error: rank {alive}: a collective timed out after 0.4 min (--collective_timeout_minutes); "
    assert error.startswith(expected + f"no answer from rank {frozen} (frozen or stuck"), error
    assert "Traceback" not in stderr


class _FullDisk:
    """A file open for writing on a disk with `room` bytes left: a write beyond them fails with ENOSPC."""

    def __init__(self, path, mode: str, room: int) -> None:
        self.file, self.room = open(path, mode), room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> "_FullDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = _synthetic_cfg(tmp_path / "run", max_steps=1)
    assert train_cli.main(_flags(cfg)) == 0
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FullDisk(path, mode, room=4096), raising=False)
    capsys.readouterr()
    assert train_cli.main(_flags(cfg.replace(max_steps=2))) == 1
    err = capsys.readouterr().err
    path = tmp_path / "run" / "checkpoint.pth"
    error = err.rsplit("\r", 1)[-1].splitlines()[-1]  # after the progress bar
    assert error == f"mugs-train: error: cannot write {path}: No space left on device; the previous {path.name} is kept"
    assert "Traceback" not in err
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint, whole
    assert not list(path.parent.glob(".checkpoint*"))  # and no partial temporary beside it


# a training step that raises something other than TrainError: the error escapes train.py with its traceback
FAILING_STEP = """import sys, train
from mugs_fast import engine
def train_step(*args):
    raise RuntimeError("a step failed")
engine.train_step = train_step
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_training_error_with_the_dali_loader_prints_nothing_else(tmp_path):
    beton = write_beton(tmp_path / "small.beton", 20)
    cfg = small_cfg(data_path=str(beton), output_dir=str(tmp_path / "run"), num_workers=1)
    proc = start([sys.executable, "-c", FAILING_STEP, *_flags(cfg)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and stderr.rstrip().endswith("RuntimeError: a step failed"), stderr[-3000:]
    # the loader's iteration is closed while DALI is up, not drained at exit from a torn-down pipeline
    assert "Exception ignored" not in stderr and "AttributeError" not in stderr, stderr[-3000:]
