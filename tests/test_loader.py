"""MultiCropLoader in DALI's CPU-only mode: small images, 32/16-px crops (the GPU path is the same graph)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from _fixtures import LOADER_ARGS, encode_jpeg, run_epochs, undefined_quant_table, write_beton

from data_prep.synth import render
from mugs_fast.data import MultiCropLoader
from mugs_fast.data.beton import BetonError
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD

B, L = 12, LOADER_ARGS["local_crops_number"]
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
    loader = MultiCropLoader(small_beton, 12, **{**LOADER_ARGS, "local_crops_number": 0}, dtype=torch.bfloat16)
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


def test_shards_of_ranks_are_disjoint_and_equal(small_beton):
    args = {**LOADER_ARGS, "local_crops_number": 0}
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


def test_undecodable_samples_are_replaced_and_counted(tmp_path):
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    corrupt = {3: b"not a jpeg at all", 10: good[: len(good) // 2], 17: undefined_quant_table(good)}
    path = write_beton(tmp_path / "corrupt.beton", 40, corrupt=corrupt)
    loader = MultiCropLoader(path, 8, **{**LOADER_ARGS, "local_crops_number": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # 3 and 10 fail the header check; 17 passes it and fails in DALI's decoder (found with PIL, batch re-run)
    assert sorted(loader.corrupt_samples) == [3, 10, 17] and len(messages) == 3
    assert "sample 17 does not decode" in " ".join(messages)
    assert loader.num_replaced == 3 and len(batches) == 5
    indices = torch.cat([b["index"] for b in batches]).numpy()
    assert len(indices) == 40 and not set(indices) & {3, 10, 17}
    assert all(b["teacher"].shape == (16, 3, 32, 32) for b in batches)
    assert loader.state_dict()["corrupt"].keys() == {3, 10, 17}
    again = list(loader)  # known now: replaced up front, the same batches
    assert_same_batches(again, batches)


def test_bad_input(tmp_path, small_beton):
    with pytest.raises(FileNotFoundError, match="no .beton file"):
        MultiCropLoader(tmp_path / "missing.beton", 8, device="cpu")
    with pytest.raises(ValueError, match="larger than the 48 samples each of the 2 rank"):
        MultiCropLoader(small_beton, 49, device="cpu", world_size=2, rank=1)
    (tmp_path / "foreign.beton").write_bytes(b"hello" * 100)
    with pytest.raises(BetonError):
        MultiCropLoader(tmp_path / "foreign.beton", 8, device="cpu")
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropLoader(small_beton, 8, device="cpu", local_crops_number=-1)


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


def test_import_stays_light():
    code = (
        "import sys, mugs_fast.data, mugs_fast.data.beton; from mugs_fast.data.beton import BetonReader; "
        "print([m for m in ('nvidia.dali', 'torchvision', 'timm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
