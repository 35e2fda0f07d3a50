"""MultiCropLoader in DALI's CPU-only mode: small images, 32/16-px crops (the GPU path is the same graph)."""

import subprocess
import sys
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
from mugs_fast.data import MultiCropLoader, dali_pipeline
from mugs_fast.data import loader as loader_module
from mugs_fast.data.beton import BetonError
from mugs_fast.data.contract import CropSpec
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD
from mugs_fast.data.params import plan_rng, sample_plan
from mugs_fast.data.sampler import EpochSampler

B, L = 12, LOADER_ARGS["crops"].local_crops_number
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
pytest_plugins = ["_data_fixtures"]  # small_beton, dali_loader


@pytest.fixture(scope="module")
def epochs(dali_loader) -> list[dict]:
    """Epochs 0-3 of the loader: 4 x 8 batches, 384 images."""
    return run_epochs(dali_loader, range(4))


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_batch_shapes_dtypes_and_value_ranges(dali_loader, epochs):
    assert len(dali_loader) == 8 and len(epochs) == 32
    batch = epochs[0]
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {
        "teacher": (2 * B, 3, 32, 32),
        "student_global": (2 * B, 3, 32, 32),
        "student_local": (L * B, 3, 16, 16),
        "weak": (B,),
        "label": (B,),
        "index": (B,),
        "strong_local": (L * B,),
    }
    for key in ("teacher", "student_global", "student_local"):
        assert batch[key].dtype == torch.float32 and batch[key].device.type == "cpu"
    assert batch["weak"].dtype == torch.bool and batch["strong_local"].dtype == torch.bool
    assert batch["label"].dtype == torch.int64
    np.testing.assert_array_equal(batch["label"].numpy(), dali_loader.reader.labels[batch["index"].numpy()])
    # teacher crops are never erased: [0, 1] before normalisation, and not constant
    teacher = torch.cat([unnormalise(b["teacher"]) for b in epochs])
    assert teacher.min() >= -1e-5 and teacher.max() <= 1 + 1e-5
    assert teacher.std((1, 2, 3)).min() > 0
    # normalised: the mean/std of normalised crops are O(1) around 0, not [0, 1] or [0, 255] values
    assert abs(float(batch["teacher"].mean())) < 0.6 and 0.5 < float(batch["teacher"].std()) < 2


def test_bf16_output(small_beton):
    loader = MultiCropLoader(small_beton, 12, **{**LOADER_ARGS, "crops": small_crops(0)}, dtype=torch.bfloat16)
    batch = next(iter(loader))
    assert batch["teacher"].dtype == torch.bfloat16 and batch["student_local"].shape == (0, 3, 16, 16)


def test_same_seed_same_batches(small_beton, dali_loader, epochs):
    twin = MultiCropLoader(small_beton, 12, **LOADER_ARGS)
    assert_same_batches(run_epochs(twin, [1]), epochs[8:16])
    assert_same_batches(run_epochs(dali_loader, [0]), epochs[:8])  # an epoch again: the same batches
    assert not torch.equal(epochs[0]["teacher"], epochs[8]["teacher"])  # another epoch: other batches


def test_strong_and_weak_proportions_and_flags(epochs):
    n = len(epochs) * B
    weak = torch.cat([b["weak"] for b in epochs])
    strong_local = torch.cat([b["strong_local"] for b in epochs])
    # coins with p = 0.5: 4 standard errors (0.026 for 384 images, 0.008 for 3,840 local crops)
    assert abs(weak.float().mean() - 0.5) < 4 * 0.5 / n**0.5
    assert abs(strong_local.float().mean() - 0.5) < 4 * 0.5 / (L * n) ** 0.5

    # random erasing (N(0, 1) noise on [0, 1] values) marks strong crops; weak crops stay in [0, 1]
    def erased(x):
        v = unnormalise(x)
        return ((v < -0.05) | (v > 1.05)).flatten(1).any(1)

    global_erased = torch.cat([erased(b["student_global"]).view(2, B) for b in epochs], 1)
    local_erased = torch.cat([erased(b["student_local"]) for b in epochs])
    assert not global_erased[:, weak].any() and not local_erased[~strong_local].any()
    erase_rate = torch.cat([global_erased[:, ~weak].ravel(), local_erased[strong_local]]).float().mean()
    assert abs(erase_rate - 0.25) < 0.05  # p = 0.25 over ~2,300 strong crops: SE 0.009

    # RandomGrayscale(p=0.2) on weak crops: exactly gray (the synthetic images are colourful)
    teacher = unnormalise(torch.cat([b["teacher"] for b in epochs]))
    gray = (teacher.amax(1) - teacher.amin(1)).flatten(1).amax(1) < 1e-4
    assert abs(gray.float().mean() - 0.2) < 4 * 0.4 / (2 * n) ** 0.5


@pytest.mark.parametrize("strong_p", [0.0, 1.0])
def test_the_crop_specs_augmentation_values_are_used(small_beton, strong_p):
    # CropSpec.strong_p (from --prob) and erase_p (--re_prob) reach the plan the loader draws
    crops = CropSpec(2, global_size=32, local_size=16, strong_p=strong_p, erase_p=1.0)
    batch = next(iter(MultiCropLoader(small_beton, B, crops=crops, device="cpu", seed=7)))
    assert (batch["weak"] == (strong_p == 0)).all() and (batch["strong_local"] == (strong_p == 1)).all()
    v = unnormalise(batch["student_local"])
    assert ((v < -0.05) | (v > 1.05)).flatten(1).any(1).all() == (strong_p == 1)  # p = 1: every strong crop erased


def test_shards_of_ranks_are_disjoint_and_equal(small_beton):
    args = {**LOADER_ARGS, "crops": small_crops(0)}
    ranks = [MultiCropLoader(small_beton, 10, rank=r, world_size=3, **args) for r in range(3)]
    indices = [torch.cat([b["index"] for b in loader]).numpy() for loader in ranks]
    assert [len(loader) for loader in ranks] == [3, 3, 3] and [len(i) for i in indices] == [30, 30, 30]
    assert len(np.unique(np.concatenate(indices))) == 90


def test_resume_sees_exactly_the_unseen_batches(small_beton, dali_loader, epochs):
    dali_loader.set_epoch(2)
    seen = []
    for batch in dali_loader:
        seen.append(batch)
        if len(seen) == 3:
            state = dali_loader.state_dict()
            break
    assert state["sampler"]["epoch"] == 2 and state["sampler"]["position"] == 3
    assert_same_batches(seen, epochs[16:19])

    resumed = MultiCropLoader(small_beton, 12, **LOADER_ARGS)  # a new process, as after a restart
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a trainer does at the top of the epoch loop: keeps the position
    assert len(list(resumed)) == 5
    resumed.load_state_dict(state)
    assert_same_batches(list(resumed), epochs[19:24])  # crops bit for bit: augmentations are resumed too

    dali_loader.load_state_dict(state)  # the same loader, rewound: also exact
    assert_same_batches(list(dali_loader), epochs[19:24])


def test_a_new_iteration_abandons_an_unfinished_one(dali_loader, epochs):
    dali_loader.set_epoch(0)
    unfinished = iter(dali_loader)
    first = next(unfinished)
    rest = list(dali_loader)  # DALI's queued work for `unfinished` is dropped, the epoch goes on
    assert_same_batches([first, *rest], epochs[:8])
    with pytest.raises(StopIteration):
        next(unfinished)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_undecodable_samples_are_replaced_and_counted(tmp_path, device):
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    corrupt = {3: b"not a jpeg at all", 10: good[: len(good) // 2], 17: undefined_quant_table(good)}
    trailing = {25: good + b"\x00" * 7 + b"vendor trailer"}  # bytes after the end marker: a valid JPEG
    path = write_beton(tmp_path / "corrupt.beton", 40, corrupt=corrupt | trailing)
    loader = MultiCropLoader(path, 8, **{**LOADER_ARGS, "crops": small_crops(2), "device": device})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # 3 and 10 fail the header check; 17 passes it and fails the strict decode
    assert sorted(loader.corrupt_samples) == [3, 10, 17] and len(messages) == 3
    assert "sample 17 does not decode" in " ".join(messages)
    assert loader.num_replaced == 3 and len(batches) == 5
    indices = torch.cat([b["index"].cpu() for b in batches]).numpy()
    assert len(indices) == 40 and not set(indices) & {3, 10, 17}
    assert all(b["teacher"].shape == (16, 3, 32, 32) and b["teacher"].device.type == device for b in batches)
    assert loader.state_dict()["corrupt"].keys() == {3, 10, 17}
    again = list(loader)  # known now: replaced up front, the same batches
    if device == "cpu":
        assert_same_batches(again, batches)
    assert torch.equal(torch.cat([b["index"].cpu() for b in again]), torch.from_numpy(indices))
    assert loader.num_replaced == 6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_damage_inside_the_scan_is_replaced_counted_and_named(tmp_path, device):
    """Damage behind intact markers (zeroed bytes, a cut with the end marker put back): DALI's decoders turn it
    into pixels without an error; the loader's strict decode finds it before DALI sees the sample."""
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    corrupt = {5: overwritten_scan(good), 22: truncated_scan(good)}
    path = write_beton(tmp_path / "damaged.beton", 40, corrupt=corrupt)
    loader = MultiCropLoader(path, 8, **{**LOADER_ARGS, "crops": small_crops(2), "device": device})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    assert sorted(loader.corrupt_samples) == [5, 22] and loader.num_replaced == 2
    assert "extraneous bytes" in loader.corrupt_samples[5]
    assert "premature end of data segment" in loader.corrupt_samples[22]
    assert "sample 5 does not decode" in messages and "sample 22 does not decode" in messages
    indices = torch.cat([b["index"].cpu() for b in batches]).numpy()
    assert len(indices) == 40 and not set(indices) & {5, 22}


def test_without_verify_only_the_header_is_checked(tmp_path):
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    path = write_beton(tmp_path / "damaged.beton", 16, corrupt={5: overwritten_scan(good), 9: b"not a jpeg"})
    loader = MultiCropLoader(path, 8, **{**LOADER_ARGS, "crops": small_crops(1), "verify": False})
    with pytest.warns(RuntimeWarning, match="sample 9 does not decode"):
        list(loader)
    assert sorted(loader.corrupt_samples) == [9]  # DALI's CPU decoder fills 5's damage in (libjpeg warns on stderr)


def test_replacements_are_counted_in_the_batches_yielded(tmp_path):
    """Not when a batch is fed: a batch fed again after a decoder failure, or fed ahead and then dropped, counts
    its replacements once, when it is yielded. (verify=False: the decoder, not the strict check, fails.)"""
    batch_1 = EpochSampler(16, 4, seed=LOADER_ARGS["seed"]).batch(1)
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    corrupt = {int(batch_1[0]): b"not a jpeg at all", int(batch_1[1]): undefined_quant_table(good)}
    path = write_beton(tmp_path / "corrupt.beton", 16, corrupt=corrupt)
    loader = MultiCropLoader(path, 4, **{**LOADER_ARGS, "crops": small_crops(1), "verify": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        next(iter(loader))  # batch 0; DALI was also fed batch 1 (prefetch), which is dropped below
        assert loader.num_replaced == 0 and int(batch_1[0]) in loader.corrupt_samples
        rest = list(loader)  # batches 1-3: batch 1 fails in the decoder and is fed again
    assert len(rest) == 3 and sorted(loader.corrupt_samples) == sorted(corrupt)
    assert loader.num_replaced == 2


def test_a_batch_reaches_the_device_in_one_copy_without_syncs(dali_loader, monkeypatch):
    """On a GPU a `.to(device)` of host data, or a `torch.tensor(..., device=...)`, makes the host wait for the
    GPU: per batch, the loader's host arrays go through one `to_device` call and nothing else moves."""
    copies, moves = [], []
    to_device, to = loader_module.to_device, torch.Tensor.to

    def counting_to_device(arrays, device):
        copies.append(sorted(arrays))
        return to_device(arrays, device)

    def watched_to(self, *args, **kwargs):
        if any(isinstance(a, (torch.device, str)) for a in (*args, *kwargs.values())):
            moves.append(args)
        return to(self, *args, **kwargs)

    def no_new_constants(*args, **kwargs):
        raise AssertionError("torch.tensor called per batch: a blocking host -> device copy on a GPU")

    monkeypatch.setattr(loader_module, "to_device", counting_to_device)
    monkeypatch.setattr(torch.Tensor, "to", watched_to)
    monkeypatch.setattr(torch, "tensor", no_new_constants)
    dali_loader.set_epoch(5)
    batches = list(dali_loader)
    assert len(copies) == len(batches) == 8 and not moves
    assert {"label", "index", "weak", "strong_local", "global.colour", "local.boxes"} <= set(copies[0])


def test_batches_out_of_order_are_an_error(small_beton, monkeypatch):
    """DALI's outputs carry their batch number: a mix-up raises (also under python -O), it is never trained on."""
    feed = dali_pipeline.source_batch
    monkeypatch.setattr(dali_pipeline, "source_batch", lambda jpegs, shapes, plan, tag: feed(jpegs, shapes, plan, 3))
    loader = MultiCropLoader(small_beton, 12, **{**LOADER_ARGS, "crops": small_crops(0)})
    with pytest.raises(RuntimeError, match="DALI returned batch 3 where 0 was expected"):
        next(iter(loader))


def test_bad_input(tmp_path, small_beton):
    with pytest.raises(FileNotFoundError, match="no .beton file"):
        MultiCropLoader(tmp_path / "missing.beton", 8, device="cpu")
    with pytest.raises(ValueError, match="larger than the 48 samples each of the 2 rank"):
        MultiCropLoader(small_beton, 49, device="cpu", world_size=2, rank=1)
    (tmp_path / "foreign.beton").write_bytes(b"hello" * 100)
    with pytest.raises(BetonError):
        MultiCropLoader(tmp_path / "foreign.beton", 8, device="cpu")
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropLoader(small_beton, 8, device="cpu", crops=small_crops(-1))


@pytest.mark.gpu
def test_gpu_loader_matches_the_cpu_one(small_beton, epochs):
    """The same plan on the GPU ('mixed' nvJPEG decoding, GPU ops): same flags and samples, close pixels."""
    gpu = MultiCropLoader(small_beton, 12, **{**LOADER_ARGS, "device": "cuda"})
    gpu.set_epoch(0)
    batches = list(gpu)
    assert batches[0]["teacher"].dtype == torch.bfloat16 and batches[0]["teacher"].is_cuda
    for g, c in zip(batches, epochs[:8], strict=True):
        for key in ("weak", "label", "index", "strong_local"):
            assert torch.equal(g[key].cpu(), c[key]), key
        # teacher crops are never erased (the noise differs between devices): decoding and resampling only
        diff = (g["teacher"].float().cpu() - c["teacher"]).abs()
        assert diff.mean() < 0.05 and diff.quantile(0.99) < 0.3


def erase_mask(boxes: np.ndarray, size: int) -> torch.Tensor:
    """(k * B, S, S) bool: inside the erased box of each crop; boxes (k, B, 4: top, left, height, width)."""
    top, left, h, w = (torch.from_numpy(boxes[..., i].reshape(-1, 1)) for i in range(4))
    ys = torch.arange(size)
    inside_y, inside_x = (ys >= top) & (ys < top + h), (ys >= left) & (ys < left + w)
    return inside_y[:, :, None] & inside_x[:, None, :]


@pytest.mark.gpu
def test_gpu_strong_crops_match_the_cpu_ones(small_beton, dali_loader, epochs):
    """Student crops of the same plan on both devices (RandAugment, crops, finishing); the erased boxes, whose
    noise comes from each device's generator, are masked out with the plan."""
    gpu = MultiCropLoader(small_beton, 12, **{**LOADER_ARGS, "device": "cuda", "dtype": torch.float32})
    gpu.set_epoch(0)
    reader, seed = dali_loader.reader, LOADER_ARGS["seed"]
    strong_diffs = []
    for i, (g, c) in enumerate(zip(gpu, epochs[:8], strict=True)):
        index = c["index"].numpy()
        plan = sample_plan(plan_rng(seed, 0, 0, i), reader.heights[index], reader.widths[index], small_crops(L))
        for key, rows, size in (("student_global", slice(2, 4), 32), ("student_local", slice(4, None), 16)):
            kept = ~erase_mask(plan.erase[rows], size)  # (k * B, S, S)
            diff = (g[key].cpu() - c[key]).abs().movedim(1, -1)  # (k * B, S, S, 3)
            assert diff[kept].mean() < 0.1, key
            strong = torch.from_numpy(plan.strong[rows].reshape(-1))
            strong_diffs.append(diff[strong][kept[strong]].ravel())
    strong_diff = torch.cat(strong_diffs)
    # nvJPEG vs libjpeg-turbo differ by a level or two, which thresholds (posterize, solarize) can amplify
    assert strong_diff.numel() > 10_000 and strong_diff.mean() < 0.1 and (strong_diff > 0.5).float().mean() < 0.05


@pytest.mark.gpu
def test_gpu_batches_need_no_host_device_sync(small_beton):
    gpu = MultiCropLoader(small_beton, 12, **{**LOADER_ARGS, "device": "cuda"})
    batches = iter(gpu)
    next(batches)  # the first batch allocates (pinned host memory, caches)
    torch.cuda.set_sync_debug_mode("error")  # any torch op that waits for the GPU raises
    try:
        rest = list(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == 7


def test_import_stays_light():
    code = (
        "import sys, mugs_fast.data, mugs_fast.data.beton; from mugs_fast.data.beton import BetonReader; "
        "print([m for m in ('nvidia.dali', 'torchvision', 'timm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
