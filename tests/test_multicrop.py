"""kernels.multicrop: the Mugs average over (teacher view, student crop) pairs."""

import pytest
import torch

from kernels.multicrop import multicrop_mean, pair_weights


@pytest.mark.parametrize("crops", [2, 3, 12])
def test_the_pair_weights_sum_to_one(crops):
    w_global, w_local = pair_weights(crops)
    assert 2 * w_global + 2 * (crops - 2) * w_local == pytest.approx(1.0)


def test_mean_of_global_and_local_pairs_without_the_diagonal():
    terms = torch.randn(2, 5, dtype=torch.float64)  # [view i, crop j]
    terms[0, 0] = terms[1, 1] = float("nan")  # (i, i) is no pair: never read
    expected = 0.5 * ((terms[0, 1] + terms[1, 0]) / 2 + terms[:, 2:].mean())
    torch.testing.assert_close(multicrop_mean(terms), expected)


def test_two_crops_is_the_global_mean():
    terms = torch.tensor([[float("nan"), 1.0], [3.0, float("nan")]], dtype=torch.float64)
    torch.testing.assert_close(multicrop_mean(terms), torch.tensor(2.0, dtype=torch.float64))
