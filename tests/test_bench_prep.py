"""benchmarks/bench_prep.py: a small run writes a record for folder and archive input, with the share kept as-is."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_prep  # noqa: E402


def test_small_run_records_folder_and_archive_input(tmp_path, capsys):
    out = tmp_path / "bench_prep.json"
    argv = ["--images", "10", "--repeats", "1", "--workers", "1", "--large-share", "0.3", "--out", str(out)]
    assert bench_prep.main(argv) == 0
    (record,) = json.loads(out.read_text())
    assert [(r["tool"], r["workers"]) for r in record["results"]] == [
        ("data_prep.convert (folder)", 1),
        ("data_prep.convert (archive)", 1),
    ]
    folder, archive = record["results"]
    large = record["input"]["larger_than_512_share"]
    assert 0 < large < 1 and folder["stored_as_is_share"] == archive["stored_as_is_share"]
    assert folder["stored_as_is_share"] == pytest.approx(1 - large)  # every image within 512 px kept as it is
    assert folder["output_mb"] == archive["output_mb"]  # the same .beton from either input
    assert "data_prep.convert (archive)" in capsys.readouterr().out
