"""The release's PIL pipeline (ReferenceLoader) and its statistical agreement with the DALI loader (CPU mode)."""

import warnings

import numpy as np
import pytest
import torch
from _fixtures import (
    LOADER_ARGS,
    encode_jpeg,
    overwritten_scan,
    run_epochs,
    small_crops,
    truncated_scan,
    undefined_quant_table,
    write_beton,
)

from data_prep.synth import render
from mugs_fast.data import MultiCropLoader, ReferenceLoader
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD
from mugs_fast.data.reference import release_rand_augment

B, EPOCHS = 12, range(4)
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
pytest_plugins = ["_data_fixtures"]  # small_beton, dali_loader


@pytest.fixture(scope="module")
def reference(small_beton):
    return ReferenceLoader(small_beton, B, num_workers=2, **LOADER_ARGS)


@pytest.fixture(scope="module")
def both(reference, dali_loader) -> tuple[list[dict], list[dict]]:
    """4 epochs (384 images) from each pipeline, same seed: the same images in the same batches."""
    return run_epochs(reference, EPOCHS), run_epochs(dali_loader, EPOCHS)


def test_same_batches_layout_and_sample_order(both):
    ref, dali = both
    assert len(ref) == len(dali) == 32
    for r, d in zip(ref, dali, strict=True):
        assert r.keys() == d.keys()
        for key in r:
            assert r[key].shape == d[key].shape and r[key].dtype == d[key].dtype, key
        assert torch.equal(r["index"], d["index"]) and torch.equal(r["label"], d["label"])


def test_deterministic_whatever_the_workers(small_beton, both):
    ref, _ = both
    in_process = ReferenceLoader(small_beton, B, num_workers=0, **LOADER_ARGS)
    in_process.set_epoch(1)
    first = next(iter(in_process))
    for key in first:
        assert torch.equal(first[key], ref[8][key]), key


@pytest.mark.parametrize("num_workers", [0, 1])
def test_undecodable_samples_are_replaced_as_in_the_dali_loader(tmp_path, num_workers):
    """PIL refuses some (not a JPEG, an undefined table) and decodes the damaged scans silently: all are found
    in the worker, replaced by the DALI loader's stand-ins, counted and named once."""
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    corrupt = {2: b"not a jpeg", 7: overwritten_scan(good), 11: truncated_scan(good), 13: undefined_quant_table(good)}
    path = write_beton(tmp_path / "damaged.beton", 24, corrupt=corrupt)
    args = {**LOADER_ARGS, "crops": small_crops(1)}
    reference = ReferenceLoader(path, 4, num_workers=num_workers, **args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = list(reference)
        dali = list(MultiCropLoader(path, 4, **args))
    assert sorted(reference.corrupt_samples) == sorted(corrupt) and reference.num_replaced == 4
    named = [str(w.message) for w in caught if "does not decode" in str(w.message)]
    assert "Corrupt JPEG data" in reference.corrupt_samples[7] and len(named) == 8  # 4 per loader
    for r, d in zip(ref, dali, strict=True):
        assert torch.equal(r["index"], d["index"]) and torch.equal(r["label"], d["label"])
    assert reference.state_dict()["corrupt"].keys() == corrupt.keys()


def test_release_rand_augment_draws_two_distinct_ops():
    ra = release_rand_augment(224)
    assert len(ra.ops) == 15 and ra.num_layers == 2 and ra.choice_weights is not None
    np.random.seed(0)
    chosen = [np.random.choice(ra.ops, 2, replace=False, p=ra.choice_weights) for _ in range(200)]
    assert all(a is not b for a, b in chosen)
    black = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    black.magnitude, black.prob, black.magnitude_std = 10, 1.0, 0
    from PIL import Image

    assert np.asarray(black(Image.new("RGB", (4, 4), (200, 100, 50)))).max() == 0  # level 10: 0 bits


STATS = ("E[R]", "E[G]", "E[B]", "E[R^2]", "E[G^2]", "E[B^2]", "saturation", "contrast")


def crop_statistics(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) crops on [0, 1] -> (N, 8): per-channel E[x] and E[x^2], the mean of max - min over the
    channels (saturation: colour jitter, grayscale) and the std of the luma (contrast: jitter, blur, RandAugment)."""
    luma = torch.einsum("nchw,c->nhw", x, torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype))
    saturation = (x.amax(1) - x.amin(1)).mean((1, 2))
    return torch.cat([x.mean((2, 3)), (x * x).mean((2, 3)), saturation[:, None], luma.std((1, 2))[:, None]], 1)


def per_image_moments(batches: list[dict], key: str, strong: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Per sample index: the mean over its crops in this group (all / strong / weak) of the STATS on [0, 1]
    values. Returns (N, 8) (NaN where the image has no such crop) and the crop counts."""
    sums, counts = np.zeros((96, len(STATS))), np.zeros(96)
    for b in batches:
        x = (b[key] * STD + MEAN).double()
        k = x.shape[0] // B
        if strong is None:
            take = torch.ones(k, B, dtype=torch.bool)
        elif key == "student_local":
            take = b["strong_local"].view(k, B) == strong
        else:
            take = (~b["weak"]).expand(k, B) == strong
        moments = crop_statistics(x).view(k, B, len(STATS))
        for slot in range(k):
            idx = b["index"].numpy()[take[slot].numpy()]
            np.add.at(sums, idx, moments[slot][take[slot]].numpy())
            np.add.at(counts, idx, 1)
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None], counts


GROUPS = [
    ("teacher", None),
    ("student_global", False),
    ("student_global", True),
    ("student_local", False),
    ("student_local", True),
]


@pytest.mark.parametrize("key, strong", GROUPS)
def test_crop_statistics_agree(both, key, strong):
    """Paired by image (each image's crops averaged over 4 epochs in each pipeline): the mean difference of
    each statistic must be within 4 standard errors of the per-image differences. With ~90 images the
    standard error of E[x] is ~0.005-0.01 on [0, 1] values, so a bias of ~0.03 (8/255) would fail."""
    ref, dali = both
    r, _ = per_image_moments(ref, key, strong)
    d, _ = per_image_moments(dali, key, strong)
    both_have = ~np.isnan(r).any(1) & ~np.isnan(d).any(1)
    diff = (d - r)[both_have]
    assert len(diff) > 80
    se = diff.std(0, ddof=1) / len(diff) ** 0.5
    z = diff.mean(0) / se
    assert (np.abs(z) < 4).all(), dict(zip(STATS, np.round(z, 2), strict=True))


def proportions_agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Two-sample binomial test at 4 standard errors."""
    p = (a.sum() + b.sum()) / (len(a) + len(b))
    se = (p * (1 - p) * (1 / len(a) + 1 / len(b))) ** 0.5
    return abs(a.mean() - b.mean()) < 4 * se


def test_grayscale_and_strong_fractions_agree(both):
    ref, dali = both

    def gray(batches):  # RandomGrayscale on the teacher's (weak) crops: R = G = B
        x = torch.cat([b["teacher"] for b in batches]) * STD + MEAN
        return ((x.amax(1) - x.amin(1)).flatten(1).amax(1) < 1e-4).numpy()

    flags = lambda batches, key: torch.cat([b[key] for b in batches]).numpy()
    assert proportions_agree(gray(ref), gray(dali))
    assert abs(gray(dali).mean() - 0.2) < 0.05
    assert proportions_agree(flags(ref, "weak"), flags(dali, "weak"))
    assert proportions_agree(flags(ref, "strong_local"), flags(dali, "strong_local"))
