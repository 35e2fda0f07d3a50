"""Each RandAugment op of the DALI graph against timm's PIL op with the same argument (CPU-only DALI)."""

import random

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def
from PIL import Image
from timm.data import auto_augment as timm_aa

from mugs_fast.data import randaugment
from mugs_fast.data.params import LEVEL_BINS, RA_FILL, RA_IDENTITY, RA_LAYERS, RA_NUM_OPS
from mugs_fast.data.randaugment import KIND_OPS, LAYER_FIELDS, LUT_TABLES, ra_arguments, rand_augment
from mugs_fast.data.reference import _posterize

H, W, LEVEL = 60, 80, 9.0
# mean |DALI - PIL| in uint8 levels; Equalize: OpenCV's histogram formula vs PIL's (a documented deviation)
TOLERANCE = {
    "Equalize": 15.0,
    "Rotate": 1.5,
    "ShearX": 1.5,
    "ShearY": 1.5,
    "TranslateXRel": 1.5,
    "TranslateYRel": 1.5,
    "SharpnessIncreasing": 1.0,
}
NAMES = timm_aa._RAND_INCREASING_TRANSFORMS
GEOMETRIC = KIND_OPS["geometric"]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 3, y * 4, 255 - x * 2], -1) + 40 * np.sin(x / 5)[..., None] + rng.normal(0, 10, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dali_outputs(image) -> list[np.ndarray]:
    """Sample j <= 15: op j at level 9 with a positive sign, then the identity (j = 15: both identity).
    Samples 16...: the geometric ops again, for a crop that is mirrored afterwards (a flipped crop slot)."""
    first = np.concatenate([np.arange(RA_NUM_OPS + 1), GEOMETRIC])
    n = len(first)
    op = np.stack([first, np.full(n, RA_IDENTITY)], -1)
    flipped = np.arange(n) > RA_NUM_OPS
    layers = ra_arguments(op, np.full((n, 2), int(LEVEL * 10)), np.zeros((n, 2), int), H, W, flipped)
    arrays = [layers[i][name] for i in range(RA_LAYERS) for name in LAYER_FIELDS]

    @pipeline_def(enable_conditionals=True)
    def pipe():
        images, *fields = fn.external_source(
            source=lambda: ([image] * n, *arrays),
            num_outputs=1 + len(arrays),
            batch=True,
            layout=["HWC"] + [None] * len(arrays),
        )
        per_layer = len(LAYER_FIELDS)
        args = [{name: fields[i * per_layer + j] for j, name in enumerate(LAYER_FIELDS)} for i in range(RA_LAYERS)]
        return rand_augment(images, args)

    p = pipe(batch_size=n, num_threads=2, device_id=None)
    p.build()
    out = p.run()[0]
    return [np.asarray(out.at(j)) for j in range(n)]


def timm_op(image: np.ndarray, name: str, monkeypatch) -> np.ndarray:
    """timm's op `name` at LEVEL with a positive sign, as the release configures it."""
    monkeypatch.setattr(random, "random", lambda: 0.0)  # timm's _randomly_negate keeps the sign
    level_to_arg = timm_aa.LEVEL_TO_ARG[name]
    args = level_to_arg(LEVEL, {"translate_const": 100, "img_mean": RA_FILL}) if level_to_arg else ()
    out = timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=RA_FILL, resample=Image.BILINEAR)
    return np.asarray(out)


@pytest.mark.parametrize("index, name", list(enumerate(NAMES)))
def test_op_matches_timm(image, dali_outputs, index, name, monkeypatch):
    diff = np.abs(dali_outputs[index].astype(int) - timm_op(image, name, monkeypatch).astype(int))
    assert diff.mean() <= TOLERANCE.get(name, 0.5), name


@pytest.mark.parametrize("index, op", list(enumerate(GEOMETRIC)))
def test_mirrored_crop_sees_the_op_of_the_flipped_image(image, dali_outputs, index, op, monkeypatch):
    """The release flips the image, then runs RandAugment; here the crop is mirrored after it: the same image."""
    name = NAMES[op]
    release = timm_op(image[:, ::-1].copy(), name, monkeypatch)  # flip, then the op
    ours = dali_outputs[RA_NUM_OPS + 1 + index][:, ::-1]  # the op for a mirrored crop, then the mirror
    assert np.abs(ours.astype(int) - release.astype(int)).mean() <= TOLERANCE[name], name


def test_mirrored_shear_y_matrix():
    """ShearY(s) maps (x, y) to (x, y + s x) about the top-left; seen through a flip: (x, y - s x + s W)."""
    op, level_bin, sign = np.array([[randaugment.SHEAR_Y, RA_IDENTITY]]), np.array([[90, 0]]), np.zeros((1, 2), int)
    matrix = ra_arguments(op, level_bin, sign, np.array([H]), np.array([W]), np.array([True]))[0]["matrix"]
    s = 0.03 * 9.0
    np.testing.assert_allclose(matrix[0], [[1, 0, 0], [-s, 1, s * W]], rtol=1e-6)


def test_identity_is_exact(image, dali_outputs):
    np.testing.assert_array_equal(dali_outputs[RA_IDENTITY], image)


@pytest.mark.parametrize("op", KIND_OPS["lut"])
def test_lookup_tables_are_timm_ops_at_every_level(op):
    """The lut kind's table of every level bin = timm's op on all 256 values (posterize at level 10: black)."""
    name = NAMES[op]
    values = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, -1))
    ops = np.full((LEVEL_BINS, 2), RA_IDENTITY)
    ops[:, 0] = op
    bins = np.stack([np.arange(LEVEL_BINS), np.zeros(LEVEL_BINS, int)], -1)
    offsets = ra_arguments(ops, bins, np.zeros_like(ops), H, W, False)[0]["lut_offset"]
    for level_bin, offset in enumerate(offsets):
        level_to_arg = timm_aa.LEVEL_TO_ARG[name]
        args = level_to_arg(level_bin / 10.0, {}) if level_to_arg else ()
        fn_ = _posterize if name == "PosterizeIncreasing" else timm_aa.NAME_TO_OP[name]
        expected = np.asarray(fn_(values, *args))[0, :, 0]
        np.testing.assert_array_equal(LUT_TABLES[offset // 256], expected, err_msg=f"{name} level bin {level_bin}")
