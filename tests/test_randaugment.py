"""Each RandAugment op of the DALI graph against timm's PIL op with the same argument (CPU-only DALI)."""

import random

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def
from PIL import Image
from timm.data import auto_augment as timm_aa

from mugs_fast.data.params import RA_FILL, RA_IDENTITY, RA_NUM_OPS
from mugs_fast.data.randaugment import ra_arguments, rand_augment

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


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 3, y * 4, 255 - x * 2], -1) + 40 * np.sin(x / 5)[..., None] + rng.normal(0, 10, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dali_outputs(image) -> list[np.ndarray]:
    """Sample j: op j at level 9 with a positive sign, then the identity (j = 15: both identity)."""
    n = RA_NUM_OPS + 1
    op = np.stack([np.arange(n), np.full(n, RA_IDENTITY)], -1)
    args = ra_arguments(op, np.full((n, 2), int(LEVEL * 10)), np.zeros((n, 2), int), np.full(n, H), np.full(n, W))
    fields = ("colour", "kernel", "matrix", "kinds")

    @pipeline_def(enable_conditionals=True)
    def pipe():
        images, *rest = fn.external_source(
            source=lambda: ([image] * n, *(args[f] for f in fields)),
            num_outputs=5,
            batch=True,
            layout=["HWC", None, None, None, None],
        )
        return rand_augment(images, *rest)

    p = pipe(batch_size=n, num_threads=2, device_id=None)
    p.build()
    out = p.run()[0]
    return [np.asarray(out.at(j)) for j in range(n)]


@pytest.mark.parametrize("index, name", list(enumerate(timm_aa._RAND_INCREASING_TRANSFORMS)))
def test_op_matches_timm(image, dali_outputs, index, name, monkeypatch):
    monkeypatch.setattr(random, "random", lambda: 0.0)  # timm's _randomly_negate keeps the sign
    level_to_arg = timm_aa.LEVEL_TO_ARG[name]
    args = level_to_arg(LEVEL, {"translate_const": 100, "img_mean": RA_FILL}) if level_to_arg else ()
    ref = timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=RA_FILL, resample=Image.BILINEAR)
    diff = np.abs(dali_outputs[index].astype(int) - np.asarray(ref).astype(int))
    assert diff.mean() <= TOLERANCE.get(name, 0.5), (name, args)


def test_identity_is_exact(image, dali_outputs):
    np.testing.assert_array_equal(dali_outputs[RA_IDENTITY], image)


def test_posterize_level_10_is_black_as_the_release():
    args = ra_arguments(np.array([[4, 15]]), np.array([[100, 0]]), np.zeros((1, 2), int), np.array([8]), np.array([8]))
    assert args["colour"][0, 0, 5] == 0  # posterize mask keeping 0 bits
