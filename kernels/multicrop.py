"""The Mugs multi-crop pairing and average (spec 5), shared by the losses, the InfoNCE reference and its kernel.

Student rows are crop-major, C crops: 0 and 1 global, the rest local; the teacher sees the two global crops
(views 0 and 1). Teacher view i is paired with every student crop j != i, and a loss is
0.5 * (mean over the 2 global pairs + mean over the 2 * (C - 2) local pairs), the global mean alone when C = 2.
"""

import torch


def pair_weights(crops: int) -> tuple[float, float]:
    """The weight of one global pair (crop j < 2, view i != j) and of one local pair (crop j >= 2) in the average."""
    if crops == 2:
        return 0.5, 0.0
    return 0.25, 0.25 / (crops - 2)


def multicrop_mean(terms: torch.Tensor) -> torch.Tensor:
    """Per-pair losses (2, C) [teacher view i, student crop j] -> their Mugs average over the pairs j != i."""
    w_global, w_local = pair_weights(terms.shape[1])
    return w_global * (terms[0, 1] + terms[1, 0]) + w_local * terms[:, 2:].sum()
