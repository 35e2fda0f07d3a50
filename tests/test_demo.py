"""mugs_fast.demo: the README's main job (synth -> convert -> inspect) end to end, on a tiny dataset."""

import json

from mugs_fast.data.beton import BetonReader
from mugs_fast.demo import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output_dir", str(out), "--seed", "3", "--train_per_class", "4", "--val_per_class", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "demo done" in stdout and "train.beton" in stdout
    assert len(BetonReader(out / "train.beton")) == 40 and len(BetonReader(out / "val.beton")) == 20
    assert json.loads((out / "val.report.json").read_text())["skipped_files"] == []
    assert (out / "train_sheet.png").stat().st_size > 0

    assert main(["--output_dir", str(out), "--seed", "3", "--train_per_class", "4", "--val_per_class", "2"]) == 0


def test_demo_error_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["--output_dir", str(tmp_path / "file"), "--train_per_class", "1", "--val_per_class", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mugs-demo: error:")
