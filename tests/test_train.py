"""train.py: the command line, SIGTERM -> checkpoint -> exit, and torchrun with 2 gloo processes = 1 process."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mugs_testing import small_cfg

import train as train_cli
from mugs_fast.checkpoint import load_checkpoint
from mugs_fast.config import MugsConfig
from mugs_fast.engine import build_model, train

REPO = Path(__file__).resolve().parents[1]


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


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = subprocess.PIPE
    return subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=pipe, stderr=pipe, **kwargs)


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
    proc = _run([sys.executable, "train.py", *_flags(cfg)])
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    # a large lr and a fast teacher, so that the teacher moves well beyond the tolerance in 3 steps
    steps, fast = 3, dict(lr=0.3, momentum_teacher=0.9)
    two = _synthetic_cfg(tmp_path / "two", batch_size_per_gpu=3, max_steps=steps, **fast)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    proc = _run([*torchrun, "train.py", *_flags(two)])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "global batch 6 on 2 process(es)" in stdout

    one = _synthetic_cfg(tmp_path / "one", batch_size_per_gpu=6, max_steps=steps, **fast)
    train(one)
    a, b = load_checkpoint(tmp_path / "two" / "checkpoint.pth"), load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    assert len(a["rng"]) == 2 and a["step"] == b["step"] == steps
    buffers = ("teacher_mem", "student_mem", "instance-sup.", "local-group-sup.", "group-sup.")
    _assert_entries_close(a, b, buffers, atol=1e-5)
    # The attention key biases get float-noise gradients (softmax ignores them) that Adam scales to about lr,
    # hence the teacher's tolerance; every other weight agrees to ~1e-5.
    _assert_entries_close(a, b, ("teacher",), atol=1e-4)
    initial = build_model(one, torch.device("cpu")).teacher.state_dict()["backbone.blocks.0.attn.qkv.weight"]
    assert (b["teacher"]["backbone.blocks.0.attn.qkv.weight"] - initial).abs().max() > 1e-3
