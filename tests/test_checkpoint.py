"""mugs_fast.checkpoint: atomic writes, RNG states, reading checkpoints back, backbone entries."""

import random

import numpy as np
import pytest
import torch
from mugs_testing import small_cfg

from mugs_fast.checkpoint import (
    CheckpointError,
    atomic_save,
    backbone_from_checkpoint,
    backbone_state,
    load_checkpoint,
    numbered_name,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from mugs_fast.mugs import Mugs


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
    (tmp_path / ".checkpoint.pth.tmp-123").write_bytes(b"half a file")
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
    atomic_save({**model.checkpoint_state(), "config": cfg.to_dict()}, tmp_path / "c.pth")
    backbone = backbone_from_checkpoint(load_checkpoint(tmp_path / "c.pth"))
    assert len(backbone.relation_blocks) == 0 and not backbone.training
    x = torch.randn(3, 3, cfg.global_crop_size, cfg.global_crop_size)
    torch.testing.assert_close(backbone.forward_cls(x), model.teacher.backbone.forward_cls(x), rtol=0, atol=0)
