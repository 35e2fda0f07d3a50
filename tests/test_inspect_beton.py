"""`inspect FILE.beton`: statistics, contact sheet, and one-line errors for bad files."""

import json
from pathlib import Path

import pytest
from PIL import Image
from prep_testing import assert_one_line_error, run_prep

from data_prep.convert import convert
from data_prep.inspect_beton import beton_stats
from data_prep.synth import write_dataset
from mugs_fast.data.beton import BetonReader


@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    data = write_dataset(root / "synth", num_classes=3, train_per_class=7, val_per_class=0, min_size=60, max_size=90)
    convert(data.train_dir, root / "train.beton", max_resolution=80, workers=2, progress=False)
    return root / "train.beton"


def inspect(*args: str):
    return run_prep("inspect", *args, timeout=60)


def test_stats(beton):
    stats = beton_stats(BetonReader(beton))
    assert stats["samples"] == 21 and stats["classes"] == 3
    assert stats["per_class"] == {"00_stripes": 7, "01_checkers": 7, "02_dots": 7}
    assert stats["longer_side"]["min"] >= 60 and stats["longer_side"]["max"] == 80  # 81-90 px downscaled
    assert stats["jpeg_bytes"]["total"] < stats["file_bytes"]


def test_cli_text_json_and_sheet(beton, tmp_path):
    sheet = tmp_path / "sheet.png"
    proc = inspect(str(beton), "--sheet", str(sheet), "--samples", "10")
    assert proc.returncode == 0, proc.stderr
    assert "21 samples, 3 classes" in proc.stdout and "01_checkers" in proc.stdout and "JPEG size" in proc.stdout
    with Image.open(sheet) as img:
        assert img.size == (4 * 128, 3 * (128 + 14))  # 10 tiles in a 4 x 3 grid, each with a caption

    proc = inspect(str(beton), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["per_class"]["02_dots"] == 7


@pytest.mark.parametrize("case", ["truncated", "foreign", "missing"])
def test_bad_file_is_a_one_line_error(beton, tmp_path, case):
    path = tmp_path / "bad.beton"
    if case == "truncated":
        path.write_bytes(beton.read_bytes()[: beton.stat().st_size * 2 // 3])
    elif case == "foreign":
        Image.new("RGB", (32, 32)).save(path, "PNG")
    expected = {"truncated": "truncated", "foreign": "not an ffcv .beton", "missing": "No such file"}[case]
    assert_one_line_error(inspect(str(path)), str(path), expected)


def test_undecodable_sample_shows_on_the_sheet_and_fails(beton, tmp_path):
    reader = BetonReader(beton)
    damaged = bytearray(beton.read_bytes())
    ptr = int(reader.ptrs[0])
    damaged[ptr : ptr + 64] = bytes(64)  # the first image loses its JPEG header
    (tmp_path / "damaged.beton").write_bytes(damaged)
    proc = inspect(str(tmp_path / "damaged.beton"), "--sheet", str(tmp_path / "s.png"), "--samples", "100")
    assert proc.returncode == 1 and "1 of the sampled images" in proc.stderr
    assert (tmp_path / "s.png").exists()
