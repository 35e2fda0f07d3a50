"""mugs_fast.data.synthetic: shapes, determinism, resumable position, W ranks = one process on W*B images."""

import pytest
import torch

from mugs_fast.data.contract import CropSpec
from mugs_fast.data.synthetic import SyntheticLoader

ARGS = dict(crops=CropSpec(3, global_size=32, local_size=16), seed=5, epoch_images=70)


def test_batches_have_the_training_shapes():
    loader = SyntheticLoader(5, dtype=torch.bfloat16, **ARGS)
    assert len(loader) == 14
    batch = next(iter(loader))
    assert batch["teacher"].shape == (10, 3, 32, 32) and batch["student_global"].shape == (10, 3, 32, 32)
    assert batch["student_local"].shape == (15, 3, 16, 16) and batch["teacher"].dtype == torch.bfloat16
    assert batch["weak"].shape == (5,) and batch["weak"].dtype == torch.bool


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_two_ranks_split_the_global_batch_of_one_process():
    single = _epoch(SyntheticLoader(6, **ARGS), 1)
    ranks = [_epoch(SyntheticLoader(3, rank=r, world_size=2, **ARGS), 1) for r in range(2)]
    assert len(single) == len(ranks[0]) == 11
    for one, r0, r1 in zip(single, *ranks, strict=True):
        assert torch.equal(one["weak"], torch.cat([r0["weak"], r1["weak"]]))
        for key, crops in (("teacher", 2), ("student_local", 3)):
            whole = one[key].view(crops, 6, *one[key].shape[1:])  # crop-major (C, B, ...)
            halves = [r[key].view(crops, 3, *r[key].shape[1:]) for r in (r0, r1)]
            assert torch.equal(whole, torch.cat(halves, dim=1)), key


def test_epochs_differ_and_repeat():
    loader = SyntheticLoader(5, **ARGS)
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    assert not torch.equal(first[0]["teacher"], second[0]["teacher"])
    assert torch.equal(_epoch(SyntheticLoader(5, **ARGS), 0)[3]["teacher"], first[3]["teacher"])


def test_state_resumes_mid_epoch():
    loader = SyntheticLoader(5, **ARGS)
    loader.set_epoch(2)
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    rest = list(batches)
    resumed = SyntheticLoader(5, **ARGS)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    again = list(resumed)
    assert len(again) == len(rest) == 12
    assert all(torch.equal(a["teacher"], b["teacher"]) for a, b in zip(again, rest, strict=True))
    with pytest.raises(ValueError, match="world_size"):
        SyntheticLoader(5, world_size=2, **ARGS).load_state_dict(state)


def test_an_epoch_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="no global batch"):
        SyntheticLoader(40, world_size=2, **ARGS)
