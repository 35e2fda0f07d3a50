"""mugs_fast.knn: the weighted vote on hand-made features, feature extraction, and the CLI's errors."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from _fixtures import write_beton

from mugs_fast.data.beton import sidecar_path
from mugs_fast.knn import knn_classify, knn_temperature, main


def _unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_clusters_are_classified_exactly():
    # three well separated directions, 7 training points each (odd count), small jitter
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 5)
    train = F.normalize(centres.repeat_interleave(7, 0) + 0.05 * torch.randn(21, 5, generator=g), dim=1)
    train_y = torch.arange(3).repeat_interleave(7)
    test = F.normalize(centres + 0.05 * torch.randn(3, 5, generator=g), dim=1)
    res = knn_classify(train, train_y, test, torch.tensor([0, 1, 2]), ks=(1, 5), temperature=0.05)
    assert res == {1: {"top1": 100.0, "top5": 100.0}, 5: {"top1": 100.0, "top5": 100.0}}


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # the test point: one close neighbour of class 1 (cos 0.9) and two farther ones of class 0 (cos 0.6)
    c, s = 0.9, math.sqrt(1 - 0.9**2)
    f, t = 0.6, math.sqrt(1 - 0.6**2)
    train = _unit([c, s, 0], [f, 0, t], [f, 0, -t], [-1, 0, 0])
    train_y = torch.tensor([1, 0, 0, 2])
    test = _unit([1, 0, 0])
    # T small: exp(0.9/T) outweighs 2 exp(0.6/T) -> class 1; T large: the two votes of class 0 win
    sharp = knn_classify(train, train_y, test, torch.tensor([1]), ks=(3,), temperature=0.05)
    flat = knn_classify(train, train_y, test, torch.tensor([1]), ks=(3,), temperature=10.0)
    assert sharp[3]["top1"] == 100.0 and flat[3]["top1"] == 0.0
    # top-5 over 3 classes always contains the label
    assert flat[3]["top5"] == 100.0


def test_k_larger_than_the_training_set_uses_all_of_it():
    # nearest two of [0, 1]: class 1 (cos 1, e^1 = 2.72) beats class 0 (cos 0.6, e^0.6 = 1.82); with all three,
    # class 0 also gets e^0 = 1 from [1, 0] and wins (2.82)
    train = _unit([1, 0], [0.8, 0.6], [0, 1])
    res = knn_classify(train, torch.tensor([0, 0, 1]), _unit([0, 1]), torch.tensor([1]), ks=(2, 200), temperature=1.0)
    assert res[2]["top1"] == 100.0 and res[200]["top1"] == 0.0


def test_temperature_follows_the_release():
    assert knn_temperature("vit_small") == knn_temperature("vit_tiny") == 0.05
    assert knn_temperature("vit_base") == knn_temperature("vit_large") == 0.04


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint of 2 training steps and two .beton files (37 train, 11 val images of 5 classes)."""
    from mugs_testing import small_cfg

    from mugs_fast.engine import train

    root = tmp_path_factory.mktemp("knn")
    train_beton = write_beton(root / "train.beton", 37, seed=1)
    val_beton = write_beton(root / "val.beton", 11, seed=2)
    cfg = small_cfg(data_path=str(train_beton), output_dir=str(root / "run"), max_steps=2, num_workers=1)
    train(cfg)
    return root / "run" / "checkpoint.pth", train_beton, val_beton


def test_cli_writes_results(tiny_run, tmp_path, capsys):
    ckpt, train_beton, val_beton = tiny_run
    out = tmp_path / "knn.json"
    args = [str(ckpt), "--train", str(train_beton), "--val", str(val_beton), "--k", "3", "50", "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert set(results["k"]) == {"3", "50"} and results["train_samples"] == 37 and results["val_samples"] == 11
    assert results["temperature"] == 0.05 and results["step"] == 2 and results["num_classes"] == 5
    for acc in results["k"].values():
        assert 0 <= acc["top1"] <= acc["top5"] <= 100
    assert "k=3" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing_checkpoint", "not_a_checkpoint", "missing_beton", "temperature_0"])
def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys, problem):
    ckpt, train_beton, val_beton = tiny_run
    extra = []
    if problem == "missing_checkpoint":
        ckpt = tmp_path / "nope.pth"
    elif problem == "not_a_checkpoint":
        ckpt = tmp_path / "garbage.pth"
        ckpt.write_bytes(b"not a zip file")
    elif problem == "missing_beton":
        val_beton = tmp_path / "nope.beton"
    else:
        extra = ["--temperature", "0"]
    assert main([str(ckpt), "--train", str(train_beton), "--val", str(val_beton), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mugs-knn: error:") and err.count("\n") == 1 and "Traceback" not in err


def _copy_with_classes(path, directory, classes):
    """A copy of the .beton `path` in `directory`, with the class list `classes` beside it (None: no list)."""
    directory.mkdir(exist_ok=True)
    copy = shutil.copy(path, directory / path.name)
    if classes is not None:
        sidecar_path(copy, "classes").write_text(json.dumps(classes))
    return copy


# (train's class list, val's class list, val's number of labels, the error); the train set has 5 labels
CLASS_LIST_CASES = {
    "same": (list("abcde"), list("abcde"), 5, None),
    "renamed": (list("abcde"), list("abxde"), 5, "label 2 is 'x' in val, 'c' in train"),
    "fewer": (list("abcde"), list("abcd"), 4, "4 classes in val, 5 in train"),
    "no_lists": (None, None, 7, "labels up to 6, but the training set train.beton has 5 classes"),
}


@pytest.mark.parametrize("case", CLASS_LIST_CASES)
def test_cli_refuses_a_val_set_whose_labels_mean_other_classes(tiny_run, tmp_path, capsys, case):
    ckpt, train_beton, _ = tiny_run
    train_classes, val_classes, val_labels, error = CLASS_LIST_CASES[case]
    train_copy = _copy_with_classes(train_beton, tmp_path / "train", train_classes)
    val = write_beton(tmp_path / "val.beton", 11, num_classes=val_labels)
    val = _copy_with_classes(val, tmp_path / "val", val_classes)
    args = [str(ckpt), "--train", str(train_copy), "--val", str(val), "--k", "3", "--out", str(tmp_path / "o.json")]
    status = main(args)
    err = capsys.readouterr().err
    if error is None:
        assert status == 0
        return
    assert status == 1 and err.startswith(f"mugs-knn: error: --val {val}: ") and err.count("\n") == 1
    assert error in err and "kNN matches labels by index" in err


@pytest.mark.parametrize("argv", [["ckpt.pth"], ["ckpt.pth", "--train", "t", "--val", "v", "--k", "ten"]])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("mugs-knn: error:") and err.count("\n") == 1
