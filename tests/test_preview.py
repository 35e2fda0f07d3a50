import subprocess
import sys

import pytest
from PIL import Image

from mugs_fast.data.preview import main

pytest_plugins = ["_data_fixtures"]  # small_beton
ARGS = ["--local-crops-number", "3", "--global-size", "32", "--local-size", "16", "--device", "cpu"]


@pytest.mark.parametrize("pipeline", ["dali", "reference"])
def test_writes_a_grid_of_all_crops(small_beton, tmp_path, pipeline, capsys):
    out = tmp_path / "crops.png"
    assert main([str(small_beton), "--out", str(out), "--images", "3", "--pipeline", pipeline, *ARGS]) == 0
    assert "3 images x 7 crops" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.mode == "RGB" and grid.height > 3 * 32 and grid.width > 4 * 32 + 3 * 16


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, beton: [str(d / "missing.beton"), "--out", str(d / "x.png")], "no .beton file"),
        (lambda d, beton: [str(beton), "--out", str(d / "no" / "x.png")], "no folder"),
        (lambda d, beton: [str(beton), "--out", str(d / "x.png"), "--images", "0"], "--images must be >= 1"),
        (lambda d, beton: [str(beton), "--out", str(d / "x.png"), "--images", "97"], "larger than the 96 samples"),
        (lambda d, beton: [str(d / "foreign.beton"), "--out", str(d / "x.png")], "not an ffcv .beton"),
    ],
)
def test_bad_input_is_a_one_line_error(small_beton, tmp_path, capsys, make_args, message):
    (tmp_path / "foreign.beton").write_bytes(b"x" * 100)
    assert main([*make_args(tmp_path, small_beton), *ARGS]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mugs_fast.data.preview",
            str(tmp_path / "none.beton"),
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "no .beton file" in result.stderr and "Traceback" not in result.stderr
