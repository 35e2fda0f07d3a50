"""mugs_fast.data.eval_loader: torchvision's Resize -> CenterCrop -> Normalize, file order, rank shares."""

import io
import warnings

import numpy as np
import pytest
import torch
from _fixtures import encode_jpeg, overwritten_scan, truncated_scan, undefined_quant_table, write_beton
from PIL import Image
from torchvision import transforms

from data_prep.synth import render
from mugs_fast.data.beton import BetonReader
from mugs_fast.data.eval_loader import INVALID, EvalLoader, centre_windows, resize_for, shard
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD

CROP = 32


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    """13 images of 40-72 px (odd sizes, both orientations), 5 classes."""
    return write_beton(tmp_path_factory.mktemp("eval") / "eval.beton", 13, seed=3)


def _torchvision(jpeg: np.ndarray) -> torch.Tensor:
    tf = transforms.Compose(
        [
            transforms.Resize(resize_for(CROP), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(CROP),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return tf(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))


def test_resize_follows_the_release():
    assert resize_for(224) == 256 and resize_for(64) == 73


def test_windows_use_torchvisions_integer_arithmetic():
    # 44x70 -> Resize(37) gives 37x58 (int(58.86)); CenterCrop(32) starts at row round(2.5) = 2, column 13
    (y0, x0, y1, x1) = centre_windows(np.array([44]), np.array([70]), 37, 32)[0]
    np.testing.assert_allclose([y0, x0, y1, x1], [2 * 44 / 37, 13 * 70 / 58, 34 * 44 / 37, 45 * 70 / 58], rtol=1e-6)


def test_images_match_torchvision(beton):
    loader = EvalLoader(beton, 5, crop_size=CROP, device="cpu", num_threads=1)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 3] and len(loader) == 3
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    reader = BetonReader(beton)
    assert images.shape == (13, 3, CROP, CROP) and images.dtype == torch.float32
    assert labels.tolist() == reader.labels.tolist()
    reference = torch.stack([_torchvision(reader[i][0]) for i in range(13)])
    # DALI's antialiased cubic resampling vs PIL's bicubic: the same window, tiny differences
    assert (images - reference).abs().mean() < 0.02
    torch.testing.assert_close(images, reference, atol=0.5, rtol=0)

    assert torch.equal(torch.cat([x for x, _ in loader]), images)  # a second pass gives the same


def test_rank_shares_are_contiguous_and_padded():
    parts = [shard(11, rank, 3) for rank in range(3)]
    assert [len(i) for i, _ in parts] == [4, 4, 4]
    indices = np.concatenate([i[real] for i, real in parts])
    assert indices.tolist() == list(range(11)) and parts[2][1].tolist() == [True, True, True, False]


def test_two_ranks_cover_the_file_once(beton):
    labels = []
    for rank in range(2):
        loader = EvalLoader(beton, 4, crop_size=CROP, device="cpu", rank=rank, world_size=2, num_threads=1)
        labels.append(torch.cat([y for _, y in loader]))
    assert [len(y) for y in labels] == [7, 7]
    both = torch.cat(labels)
    assert both[-1] == INVALID and both[:-1].tolist() == BetonReader(beton).labels.tolist()


def test_undecodable_sample_is_left_out(tmp_path):
    good = encode_jpeg(np.full((40, 50, 3), 128, np.uint8))
    path = write_beton(tmp_path / "bad.beton", 7, corrupt={2: good[: len(good) // 2]})
    with pytest.warns(RuntimeWarning, match="sample 2 is left out"):
        labels = torch.cat([y for _, y in EvalLoader(path, 4, crop_size=CROP, device="cpu", num_threads=1)])
    assert labels[2] == INVALID and (labels[[0, 1, 3, 4, 5, 6]] >= 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_damage_inside_the_scan_is_left_out_and_named_once(tmp_path, device):
    """Damage behind intact markers passes the header check and DALI's decoders: the strict decode finds it (and
    a sample DALI refuses, which would otherwise stop the pass)."""
    good = encode_jpeg(render(np.random.default_rng(1), 0, 50, 60))
    corrupt = {1: overwritten_scan(good), 4: truncated_scan(good), 5: undefined_quant_table(good)}
    path = write_beton(tmp_path / "damaged.beton", 9, corrupt=corrupt)
    loader = EvalLoader(path, 4, crop_size=CROP, device=device, num_threads=1)
    with pytest.warns(RuntimeWarning) as caught:
        labels = torch.cat([y.cpu() for _, y in loader])
    assert sorted(loader.corrupt_samples) == [1, 4, 5] and len(caught) == 3
    assert "sample 4 is left out (Corrupt JPEG data: premature end" in " ".join(str(w.message) for w in caught)
    assert (labels[[1, 4, 5]] == INVALID).all() and (labels[[0, 2, 3, 6, 7, 8]] >= 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # known now: left out again without a new warning
        assert torch.equal(torch.cat([y.cpu() for _, y in loader]), labels)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .beton file"):
        EvalLoader(tmp_path / "nope.beton", 4)
