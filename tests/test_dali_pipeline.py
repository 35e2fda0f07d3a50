"""The DALI graph's batch layout (one sample per crop) and its size; the loader tests run it end to end."""

import numpy as np
import pytest

from mugs_fast.data import params
from mugs_fast.data.contract import CropSpec
from mugs_fast.data.dali_pipeline import SOURCE_FIELDS, multicrop_pipeline, no_origin_tracing, source_batch
from mugs_fast.data.randaugment import KIND_OPS

B, L = 3, 5


@pytest.fixture(scope="module")
def batch() -> dict:
    rng = np.random.default_rng(0)
    shapes = np.array([[40, 61], [57, 33], [45, 45]])
    plan = params.sample_plan(rng, shapes[:, 0], shapes[:, 1], CropSpec(L, 32, 16))
    jpegs = [np.full(n, i, np.uint8) for i, n in enumerate((11, 7, 9))]
    fields = source_batch(jpegs, shapes, plan, tag=5)
    return {"plan": plan, "jpegs": jpegs, **dict(zip(SOURCE_FIELDS, fields, strict=True))}


def test_one_sample_per_crop_slot_and_image(batch):
    n, plan = (4 + L) * B, batch["plan"]
    assert all(len(batch[name]) == n for name in SOURCE_FIELDS)
    # sample k * B + b: slot k of image b; slot 0 decodes, every sample uses the pixels of its image's slot 0
    assert [len(j) for j in batch["jpeg"]] == [11, 7, 9] + [0] * (n - B)
    np.testing.assert_array_equal(batch["owner"], np.arange(n) < B)
    np.testing.assert_array_equal(batch["source"], np.tile(np.arange(B), 4 + L))
    np.testing.assert_array_equal(batch["roi_start"][2 * B + 1], plan.roi[2, 1, :2])
    np.testing.assert_array_equal(batch["roi_end"][7 * B + 2], plan.roi[7, 2, 2:])
    np.testing.assert_array_equal(batch["size"][:, 0], np.repeat([32] * 4 + [16] * L, B))
    np.testing.assert_array_equal(batch["sigma"], plan.blur.ravel())
    np.testing.assert_array_equal(batch["blur"], plan.blur.ravel() > 0)
    assert (batch["tag"] == 5).all()


def test_rand_augment_arguments_follow_the_plan(batch):
    plan = batch["plan"]
    applied = plan.ra_op[..., 0].ravel() != params.RA_IDENTITY  # layer 0
    kinds = np.stack([batch[f"ra0_{kind}"] for kind in KIND_OPS])
    np.testing.assert_array_equal(kinds.sum(0), applied)  # one kind per applied op, none for weak crops
    assert not applied[~plan.strong.ravel()].any()


def define_gpu_graph(local_crops_number: int):
    """The 'mixed' (GPU) graph, defined but not built: Python-level checks of every operator's arguments."""
    with no_origin_tracing():
        pipe = multicrop_pipeline(
            lambda: None, 32, "mixed", 0.75, batch_size=(4 + local_crops_number) * B, num_threads=1, device_id=0
        )
        pipe._build_graph()  # private DALI API: the graph without a GPU to build it on
    return pipe


def test_gpu_graph_is_small_whatever_the_number_of_crops():
    """One operator per step over all crops: the count does not grow with the crops (it was ~1,900 for 14)."""
    counts = {num: len(define_gpu_graph(num)._ops) for num in (1, 10)}
    assert counts[1] == counts[10] < 200
