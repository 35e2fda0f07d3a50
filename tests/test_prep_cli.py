"""`mugs-prep`: values that cannot work are one-line usage errors (exit status 2) before anything is done."""

import pytest
from prep_testing import assert_one_line_error, run_prep


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["inspect", "any.beton", "--samples", "0"], "--samples: must be >= 1, got 0"),
        (["inspect", "any.beton", "--samples", "-3"], "--samples: must be >= 1, got -3"),
        (["synth", "{out}", "--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["synth", "{out}", "--num-classes", "0"], "--num-classes: must be 1..10, got 0"),
        (["synth", "{out}", "--num-classes", "11"], "--num-classes: must be 1..10, got 11"),
        (["synth", "{out}", "--train-per-class", "-1"], "--train-per-class: must be >= 0, got -1"),
        (["synth", "{out}", "--min-size", "4"], "--min-size: must be >= 8, got 4"),
        (["synth", "{out}", "--workers", "0"], "--workers: must be 1..1024, got 0"),
        (["convert"], "the following arguments are required: SRC, DST.beton"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line(argv, fragment, tmp_path):
    out = tmp_path / "out"
    proc = run_prep(*(arg.format(out=out) for arg in argv))
    assert_one_line_error(proc, fragment, status=2)
    assert list(tmp_path.iterdir()) == []  # nothing written
