import numpy as np
import pytest

from mugs_fast.data.sampler import EpochSampler


def epoch_batches(sampler: EpochSampler) -> np.ndarray:
    return np.stack([sampler.batch(i) for i in range(len(sampler))])


@pytest.mark.parametrize("num_samples, batch_size, world_size", [(103, 7, 1), (103, 7, 3), (64, 8, 4), (50, 5, 2)])
def test_shards_are_disjoint_equal_and_drop_the_rest(num_samples, batch_size, world_size):
    samplers = [EpochSampler(num_samples, batch_size, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    lengths = {len(s) for s in samplers}
    assert lengths == {num_samples // (batch_size * world_size)}
    shards = [epoch_batches(s).ravel() for s in samplers]
    everything = np.concatenate(shards)
    assert len(np.unique(everything)) == len(everything)  # disjoint, no repeats inside a shard
    assert everything.min() >= 0 and everything.max() < num_samples


def test_seeded_per_epoch_shuffle():
    a, b = EpochSampler(97, 8, seed=1), EpochSampler(97, 8, seed=1)
    np.testing.assert_array_equal(epoch_batches(a), epoch_batches(b))
    first = epoch_batches(a)
    a.set_epoch(1)
    assert not np.array_equal(epoch_batches(a), first)
    assert not np.array_equal(epoch_batches(EpochSampler(97, 8, seed=2)), first)


def test_drop_last_drops_a_different_rest_each_epoch():
    s = EpochSampler(10, 3)  # 3 batches, 1 sample left out per epoch
    left_out = set()
    for epoch in range(20):
        s.set_epoch(epoch)
        left_out |= set(range(10)) - set(epoch_batches(s).ravel())
    assert len(left_out) > 1


def test_state_round_trip_and_set_epoch_keeps_a_loaded_position():
    s = EpochSampler(100, 10, seed=4)
    s.set_epoch(2)
    s.position = 6
    t = EpochSampler(100, 10, seed=4)
    t.load_state_dict(s.state_dict())
    t.set_epoch(2)  # the trainer calls set_epoch(epoch) on resume: same epoch, position kept
    assert (t.epoch, t.position) == (2, 6)
    np.testing.assert_array_equal(t.batch(6), s.batch(6))
    t.set_epoch(3)
    assert (t.epoch, t.position) == (3, 0)


def test_state_from_a_different_setup_is_refused():
    state = EpochSampler(100, 10, seed=4).state_dict()
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(100, 10, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(100, 20, seed=4).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=10, batch_size=11), "larger than the 10 samples"),
        (dict(num_samples=10, batch_size=3, world_size=4), "larger than the 2 samples"),
        (dict(num_samples=10, batch_size=0), "batch_size"),
        (dict(num_samples=10, batch_size=2, rank=2, world_size=2), "rank"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpochSampler(**kwargs)
