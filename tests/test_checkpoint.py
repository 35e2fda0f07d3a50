"""mugs_fast.checkpoint: atomic writes, the release's layout, RNG states, reading checkpoints back, backbones."""

import errno
import io
import os
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mugs_testing import make_batch, small_cfg
from prep_testing import dead_pid

from mugs_fast.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    atomic_save,
    backbone_from_checkpoint,
    backbone_state,
    load_checkpoint,
    load_memory_entry,
    load_queue_entry,
    load_release_entries,
    memory_entry,
    numbered_name,
    queue_entry,
    release_entries,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from mugs_fast.memory import FeatureMemory, FeatureQueue
from mugs_fast.mugs import Mugs, train_step
from mugs_fast.optim import build_optimizer, build_schedules


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert torch.load(path)["step"] == 2 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1}, path)
    with pytest.raises(Exception, match="pickle"):
        atomic_save({"step": 2, "bad": lambda: None}, path)  # torch.save fails mid-write
    assert torch.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / f".checkpoint.pth.tmp-{dead_pid()}").write_bytes(b"half a file")
    (tmp_path / "keep.txt").write_text("x")
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_numbered_name_is_the_releases():
    assert numbered_name(50) == "checkpoint0050.pth"


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), np.random.randn()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # numpy's cached Gaussian is part of the state
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pth")
    expected = _draw()
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert _draw() == expected


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a mugs-fast training checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_backbone_entries_lose_their_prefixes():
    state = {"module.backbone.cls_token": 1, "module.backbone.relation_blocks.0.norm1.weight": 2, "module.head.w": 3}
    assert backbone_state(state, relation_blocks=True) == {"cls_token": 1, "relation_blocks.0.norm1.weight": 2}
    assert backbone_state(state, relation_blocks=False) == {"cls_token": 1}


def test_backbone_from_checkpoint_is_the_teacher(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg()
    model = Mugs(cfg)
    with torch.no_grad():
        model.teacher.backbone.norm.weight.add_(1.0)  # teacher != student
    atomic_save({**release_entries(model), "config": cfg.to_dict()}, tmp_path / "c.pth")
    backbone = backbone_from_checkpoint(load_checkpoint(tmp_path / "c.pth"))
    assert len(backbone.relation_blocks) == 0 and not backbone.training
    x = torch.randn(3, 3, cfg.global_crop_size, cfg.global_crop_size)
    torch.testing.assert_close(backbone.forward_cls(x), model.teacher.backbone.forward_cls(x), rtol=0, atol=0)


def test_release_entries_round_trip():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = Mugs(cfg)
    opt, sched = build_optimizer(cfg, model.student), build_schedules(cfg, 3)
    for step in range(2):
        train_step(model, opt, sched, make_batch(cfg, seed=step), step)
    state = release_entries(model)
    assert set(state) == {
        "student",
        "teacher",
        "student_mem",
        "teacher_mem",
        "instance-sup.",
        "local-group-sup.",
        "group-sup.",
    }
    assert all(k.startswith("module.") for k in state["student"]) and not any(
        k.startswith("module.") for k in state["teacher"]
    )
    assert state["instance-sup."]["queue"].shape == (24, 97) and "block.queue_k" in state["student_mem"]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = Mugs(cfg)
    load_release_entries(other, torch.load(buf, weights_only=True))
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=0)


def test_queue_entry_is_the_releases_columns_and_round_trips():
    torch.manual_seed(0)
    q = FeatureQueue(7, 3)
    for _ in range(2):
        q.enqueue(torch.randn(2, 2, 3))  # (V, B, E): 8 rows, wrapping around
    state = queue_entry(q)
    assert state["queue"].shape == (3, 7)  # the release stores columns
    other = FeatureQueue(7, 3)
    load_queue_entry(other, state)
    torch.testing.assert_close(other.queue, q.queue, rtol=0, atol=0)
    assert int(other.ptr) == int(q.ptr) == 1


def test_memory_entry_round_trip():
    torch.manual_seed(0)
    mem = FeatureMemory(9, 4)
    mem.write(torch.randn(3, 4))
    state = memory_entry(mem)
    assert set(state) == {"block.queue_q", "block.queue_k", "block.queue_v", "block.queue_ptr"}
    other = FeatureMemory(9, 4)
    load_memory_entry(other, state)
    torch.testing.assert_close(other.features, mem.features, rtol=0, atol=0)
    torch.testing.assert_close(other.shadow(), mem.shadow())
    assert int(other.ptr) == 3


def test_a_numbered_copy_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = atomic_save({"step": 1}, tmp_path / "checkpoint.pth")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    saver = SimpleNamespace(rt=SimpleNamespace(is_main=True), path=path, output_dir=tmp_path)  # what it reads
    with pytest.raises(CheckpointWriteError) as e:
        Checkpointer.keep_numbered(saver, 50)
    copy = tmp_path / numbered_name(50)
    assert str(e.value) == f"cannot write {copy}: No space left on device; no {copy.name} was written"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
