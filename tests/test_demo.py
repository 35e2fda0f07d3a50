"""mugs_fast.demo: the README's main job (synth -> convert -> train -> kNN -> summary) end to end, tiny."""

import json
import shlex

import pytest

from mugs_fast.config import parse_config
from mugs_fast.data.beton import BetonReader
from mugs_fast.demo import demo_config, main, train_command

TINY = ["--seed", "3", "--train_per_class", "4", "--val_per_class", "2", "--epochs", "2"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output_dir", str(out), *TINY]) == 0
    stdout = capsys.readouterr().out
    assert "demo done" in stdout and "same network at initialisation" in stdout and "chance 10.0%" in stdout
    assert len(BetonReader(out / "train.beton")) == 40 and len(BetonReader(out / "val.beton")) == 20
    assert json.loads((out / "val.beton.report.json").read_text())["skipped_files"] == []
    assert (out / "train_sheet.png").stat().st_size > 0 and (out / "learning_curves.png").stat().st_size > 0

    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["knn_top1"]) == {"trained", "initial", "chance"} and summary["knn_top1"]["chance"] == 10.0
    assert summary["knn"]["trained"]["val_samples"] == 20 and summary["knn"]["trained"]["train_samples"] == 40
    assert set(summary["seconds"]) == {"data", "train", "knn", "linear"}
    assert set(summary["linear_top1"]) == {"trained", "initial", "chance"} and summary["linear_top1"]["chance"] == 10.0
    assert summary["linear"]["trained"]["val_samples"] == 20 and len(summary["linear"]["initial"]["grid"]) == 20
    assert "linear-probe top-1 on val" in stdout
    per_epoch = summary["knn_top1_per_epoch"]  # measured at the end of every epoch; the last one is the trained's
    assert [e["epoch"] for e in per_epoch] == [1, 2] and per_epoch[-1]["top1"] == summary["knn_top1"]["trained"]
    assert "trained, at the end of each epoch:" in stdout
    run = json.loads((out / "run" / "config.json").read_text())
    assert run["recipe"] == "tiny" and run["epochs"] == 2

    assert main(["--output_dir", str(out), *TINY]) == 0  # re-running replaces the run


def test_demo_error_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["--output_dir", str(tmp_path / "file"), "--train_per_class", "1", "--val_per_class", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mugs-demo: error:")


def test_demo_bad_training_value_is_a_usage_error_before_any_work(tmp_path, capsys):
    for flag, value in (("--epochs", "0"), ("--seed", "-1")):
        with pytest.raises(SystemExit) as e:
            main(["--output_dir", str(tmp_path / "demo"), flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mugs-demo: error: {flag} {value}: must be") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # no data made


def test_printed_train_command_trains_the_same_run(tmp_path):
    cfg = demo_config(tmp_path / "my demo", seed=4, epochs=2)
    command = shlex.split(train_command(cfg))
    assert command[:2] == ["python", "train.py"]
    assert parse_config(command[2:]) == cfg
