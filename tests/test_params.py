"""The host-side augmentation plan and the torch finishing step (no DALI)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F

from mugs_fast.data import params
from mugs_fast.data.contract import CropSpec
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD, CropFinisher, finish_arrays, to_device

B, L = 4000, 10


@pytest.fixture(scope="module")
def plan():
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(60, 500, B), rng.integers(60, 500, B)
    return params.sample_plan(rng, heights, widths, CropSpec(L, 224, 96)), heights, widths


def near(value, p, n, sigmas=4.0):
    return abs(float(np.mean(value)) - p) < sigmas * (p * (1 - p) / n) ** 0.5


def test_crop_windows_follow_random_resized_crop(plan):
    plan, heights, widths = plan
    y0, x0, y1, x1 = np.moveaxis(plan.roi, -1, 0)
    h, w = y1 - y0, np.abs(x1 - x0)
    assert (y0 >= 0).all() and (y1 <= heights).all() and (np.minimum(x0, x1) >= 0).all()
    assert (np.maximum(x0, x1) <= widths).all() and (h > 0).all() and (w > 0).all()
    area = h * w / (heights * widths)
    for rows, (lo, hi) in ((slice(0, 4), params.GLOBAL_SCALE), (slice(4, None), params.LOCAL_SCALE)):
        found = (area[rows] >= lo * 0.97) & (area[rows] <= hi * 1.03)  # rounding; rare fallbacks are centre crops
        assert found.mean() > 0.97
    assert near(x0 > x1, 0.5, x0.size)  # flips


def test_coins_and_which_crops_get_which_ops(plan):
    plan, _, _ = plan
    strong, weak = plan.strong, ~plan.strong
    assert not strong[:2].any() and (strong[2] == strong[3]).all()
    assert near(strong[2], 0.5, B) and near(strong[4:], 0.5, B * L)
    assert (plan.weak == weak[2]).all()
    blur = plan.blur > 0
    assert (blur[0] == weak[0]).all() and near(blur[1], 0.1, B) and not blur[strong].any()
    assert near(blur[4:][weak[4:]], 0.5, weak[4:].sum())
    assert ((plan.blur[blur] >= 0.1) & (plan.blur[blur] <= 2.0)).all()
    assert not plan.solarize[[0, 2]].any() and not plan.solarize[4:].any() and not plan.solarize[strong].any()
    assert near(plan.solarize[1], 0.2, B)
    identity = np.broadcast_to(np.eye(3, dtype=np.float32), plan.colour.shape)
    assert (plan.colour[strong] == identity[strong]).all() and (plan.contrast_shift[strong] == 0).all()
    jittered = ~np.isclose(plan.colour[weak], identity[weak]).all((-1, -2))
    assert near(jittered, 1 - 0.2 * 0.8, weak.sum())  # identity: no jitter (p 0.2) and no gray (p 0.8)


def test_rand_augment_choices(plan):
    plan, _, _ = plan
    strong = plan.strong
    assert (plan.ra_op[~strong] == params.RA_IDENTITY).all()
    applied = plan.ra_op[strong] != params.RA_IDENTITY
    assert near(applied, params.RA_OP_P, applied.size)
    both = applied.all(-1)
    assert (plan.ra_op[strong][both, 0] != plan.ra_op[strong][both, 1]).all()  # the release: no replacement
    counts = np.bincount(plan.ra_op[strong][applied], minlength=params.RA_NUM_OPS)
    assert counts.min() > 0.8 * counts.mean()
    level = plan.ra_bin[strong] / 10
    assert abs(level.mean() - 9.0) < 0.01 and abs(level.std() - 0.5) < 0.02 and level.max() <= 10


def test_erase_boxes(plan):
    plan, _, _ = plan
    on = plan.erase[..., 2] > 0
    assert not on[~plan.strong].any() and near(on[plan.strong], params.ERASE_P, plan.strong.sum())
    top, left, h, w = np.moveaxis(plan.erase, -1, 0)
    size = np.array([224] * 4 + [96] * L)[:, None]
    assert (top + h <= size).all() and (left + w <= size).all()
    area = (h * w / size**2)[on]
    assert area.min() > 0.015 and area.max() < 0.34


def test_colour_affine_is_torchvision_colour_jitter_and_grayscale():
    """Brightness, contrast, saturation and grayscale in any order = one affine map (values kept off the clamp)."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(0.35, 0.65, (5, 3, 9, 11)).astype(np.float32))
    b, c, s = rng.uniform(0.8, 1.2, 5), rng.uniform(0.8, 1.2, 5), rng.uniform(0.8, 1.2, 5)
    gray = np.array([False, False, True, False, True])
    a, shift = params.colour_affine(b, c, s, np.zeros(5), gray)
    for i in range(5):
        ref = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x[i], b[i]), c[i]), s[i])
        if gray[i]:
            ref = F.rgb_to_grayscale(ref, num_output_channels=3)
        mean_luma = x[i].mean((1, 2)) @ torch.tensor([0.299, 0.587, 0.114])
        ours = torch.einsum("ij,jhw->ihw", torch.from_numpy(a[i]), x[i]) + float(shift[i]) * mean_luma
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)  # torchvision rounds the luma weights


def test_finish_crops_normalises_solarises_and_erases():
    rng = np.random.default_rng(2)
    k, b, size = 2, 3, 7
    plan = params.sample_plan(rng, np.full(b, 50), np.full(b, 50), CropSpec(0, size, size))
    plan.colour[:] = np.eye(3, dtype=np.float32)
    plan.contrast_shift[:] = 0
    plan.solarize[:] = False
    plan.solarize[1, 0] = True
    plan.erase[:] = 0
    plan.erase[0, 2] = (1, 2, 3, 4)
    u8 = torch.from_numpy(rng.integers(0, 256, (k + 2, b, size, size, 3), dtype=np.uint8))
    finisher = CropFinisher(torch.device("cpu"), torch.float32)
    arrays = to_device(finish_arrays(plan, slice(0, k)), torch.device("cpu"))
    out = finisher(u8[:k], arrays, torch.Generator().manual_seed(0))
    x = u8[:k].permute(0, 1, 4, 2, 3).float() / 255  # (k, b, 3, S, S)
    x[1, 0] = torch.where(x[1, 0] >= 127.5 / 255, 1 - x[1, 0], x[1, 0])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ref = ((x - mean) / std).reshape(k * b, 3, size, size)
    box = (slice(None), slice(1, 4), slice(2, 6))
    erased = out[2][box] * std + mean  # crop 0 of image 2: N(0, 1) noise before normalisation
    assert erased.std() > 0.5
    out[2][box] = ref[2][box]
    torch.testing.assert_close(out, ref)


def host_arrays() -> dict[str, np.ndarray]:
    """Arrays of every dtype and odd size the loader copies, and an empty one."""
    rng = np.random.default_rng(3)
    return {
        "flags": rng.random(7) < 0.5,
        "labels": rng.integers(-5, 1000, 5),
        "colour": rng.random((3, 5, 3, 3), dtype=np.float32),
        "none": np.zeros((2, 0), np.int64),
        "offsets": rng.integers(0, 60000, (3, 1), dtype=np.uint16),
        "bytes": rng.integers(0, 256, 13, dtype=np.uint8),
    }


def test_to_device_keeps_names_values_shapes_and_dtypes():
    arrays = host_arrays()
    out = to_device(arrays, torch.device("cpu"))
    assert out.keys() == arrays.keys()
    for name, a in arrays.items():
        torch.testing.assert_close(out[name], torch.from_numpy(a), rtol=0, atol=0)


def test_to_device_makes_one_non_blocking_copy_from_pinned_memory(monkeypatch):
    """For a GPU: one pinned buffer, one asynchronous copy (a blocking copy would make the host wait)."""
    calls = []

    def pin_memory(self):
        calls.append(("pin_memory", self.numel()))
        return self

    def to(self, *args, **kwargs):
        calls.append(("to", args, kwargs))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    arrays = host_arrays()
    out = to_device(arrays, torch.device("cuda", 0))
    total = sum(-(-a.nbytes // 8) * 8 for a in arrays.values())
    assert calls == [("pin_memory", total), ("to", (torch.device("cuda", 0),), {"non_blocking": True})]
    for name, a in arrays.items():
        assert torch.equal(out[name], torch.from_numpy(a)), name


def test_the_configs_augmentation_values_reach_the_plan():
    # --global_crops_scale, --local_crops_scale, --prob and --re_prob, through CropSpec as the loaders build it
    from mugs_fast.config import recipe

    cfg = recipe("tiny", global_crops_scale=(0.81, 0.9), local_crops_scale=(0.3, 0.4), prob=0.2, re_prob=1.0)
    spec = CropSpec.from_config(cfg)
    assert (spec.global_scale, spec.local_scale, spec.strong_p, spec.erase_p) == ((0.81, 0.9), (0.3, 0.4), 0.8, 1.0)
    b, size = 2000, 400
    plan = params.sample_plan(np.random.default_rng(0), np.full(b, size), np.full(b, size), spec)
    y0, x0, y1, x1 = np.moveaxis(plan.roi, -1, 0)
    area = (y1 - y0) * np.abs(x1 - x0) / size**2
    assert ((area[:4] > 0.79) & (area[:4] < 0.92)).mean() > 0.97  # rounding; rare fallbacks are centre crops
    assert ((area[4:] > 0.29) & (area[4:] < 0.41)).mean() > 0.97
    assert near(plan.strong[2], 0.8, b) and near(plan.strong[4:], 0.8, b * spec.local_crops_number)
    assert ((plan.erase[..., 2] > 0) == plan.strong).mean() > 0.99  # p = 1: every strong crop (a box fits)
