"""mugs_fast.linear (+ linear_features, linear_sweep): features as the release's probe, the batched grid against
one classifier at a time, the held-out split, the cache, the backbone files it reads, and the CLI's errors."""

import argparse
import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fixtures import write_beton
from mugs_testing import small_cfg, start, torchrun
from safetensors.torch import save_file

from mugs_fast.checkpoint import CheckpointError, atomic_save, backbone_from_checkpoint, release_entries
from mugs_fast.data.beton import sidecar_path
from mugs_fast.export import export
from mugs_fast.linear import SweepSettings, fit_and_score, main
from mugs_fast.linear_features import FeatureSpec, cached_extract, extract, load_backbone, probe_features
from mugs_fast.linear_sweep import Grid, epoch_batches, grid_accuracy, holdout_split, init_grid, train_grid
from mugs_fast.mugs import Mugs
from mugs_fast.vit import build_backbone

SMALL_HEADS = dict(head_hidden_dim=32, pred_hidden_dim=32, group_out_dim=64, group_bottleneck_dim=16)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def _backbone(depth: int = 3, size: int = 32):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", depth=depth, img_size=size, num_relation_blocks=0)
    _perturb(backbone)
    return backbone.eval()


# ---- features ----


@pytest.mark.parametrize("n_last_blocks, avgpool", [(2, False), (3, False), (1, True), (2, True)])
def test_features_equal_a_direct_computation_from_the_blocks(n_last_blocks, avgpool):
    backbone = _backbone(depth=3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = []
    for depth in range(3 - n_last_blocks + 1, 4):  # CLS after the final LN of the backbone cut after `depth` blocks
        cut = copy.deepcopy(backbone)
        cut.blocks = cut.blocks[:depth]
        expected.append(cut.forward_cls(x))
    if avgpool:
        expected.append(backbone.forward_features(x)[:, 1:].mean(dim=1))
    with torch.no_grad():
        got = probe_features(backbone, x, n_last_blocks, avgpool)
    assert got.shape == (3, (n_last_blocks + avgpool) * 192)
    torch.testing.assert_close(got, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    return write_beton(root / "train.beton", 37, seed=1), write_beton(root / "val.beton", 11, seed=2)


def test_extracted_views_are_the_crop_and_its_flip(betons):
    from mugs_fast.data.eval_loader import EvalLoader

    backbone, train = _backbone(depth=2), betons[0]
    spec = FeatureSpec(n_last_blocks=2, avgpool_patchtokens=True, crop_size=32, flip=True, dtype="float32")
    views, labels = extract(backbone, train, spec, batch_size=8, num_threads=1)
    images = torch.cat([x for x, _ in EvalLoader(train, 37, crop_size=32, device="cpu", num_threads=1)])
    with torch.no_grad():
        crop, flipped = (probe_features(backbone, x, 2, True) for x in (images, images.flip(-1)))
    assert views.shape == (2, 37, 3 * 192) and labels.tolist() == [i % 5 for i in range(37)]
    torch.testing.assert_close(views[0], crop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(views[1], flipped, rtol=1e-5, atol=1e-5)


def test_the_cache_round_trips_and_is_rebuilt_for_other_weights(betons, tmp_path):
    backbone, train = _backbone(depth=2), betons[0]
    spec = FeatureSpec(n_last_blocks=1, avgpool_patchtokens=False, crop_size=32, flip=True, dtype="float32")
    args = dict(batch_size=16, num_threads=1)
    from mugs_fast.linear_features import state_digest

    built = cached_extract(backbone, train, spec, tmp_path, state_digest(backbone), **args)
    read = cached_extract(backbone, train, spec, tmp_path, state_digest(backbone), **args)
    assert (built[2], read[2]) == (False, True)
    assert torch.equal(built[0], read[0]) and torch.equal(built[1], read[1])
    other_spec = FeatureSpec(**{**spec.__dict__, "flip": False})
    assert cached_extract(backbone, train, other_spec, tmp_path, state_digest(backbone), **args)[2] is False
    _perturb(backbone, seed=5)
    rebuilt = cached_extract(backbone, train, spec, tmp_path, state_digest(backbone), **args)
    assert rebuilt[2] is False and not torch.allclose(rebuilt[0], built[0])


# ---- the sweep ----


def test_the_batched_grid_gives_the_weights_of_each_classifier_trained_alone():
    g = torch.Generator().manual_seed(0)
    views, labels = torch.randn(2, 23, 7, generator=g), torch.randint(0, 3, (23,), generator=g)
    rows = np.array([0, 2, 3, 5, 7, 8, 9, 11, 13, 14, 16, 17, 19, 20, 22])
    lrs, wds, epochs, batch = (0.05, 2.0), (0.0, 0.01), 3, 4
    grid = train_grid(views, labels, rows, lrs=lrs, wds=wds, num_classes=3, epochs=epochs, batch_size=batch, seed=3)
    init_weight, _ = init_grid(4, 7, 3, 3, torch.device("cpu"))
    for k, (lr, wd) in enumerate(grid.points):
        linear = torch.nn.Linear(7, 3)
        with torch.no_grad():
            linear.weight.copy_(init_weight[k])
            linear.bias.zero_()
        opt = torch.optim.SGD(linear.parameters(), lr=lr * batch / 256, momentum=0.9, weight_decay=wd)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for epoch in range(epochs):
            for positions, view in epoch_batches(len(rows), batch, 2, 3, epoch):
                image = rows[positions]
                opt.zero_grad()
                F.cross_entropy(linear(views[view, image]), labels[image]).backward()
                opt.step()
            schedule.step()
        torch.testing.assert_close(grid.weight[k], linear.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grid.bias[k], linear.bias.detach(), rtol=1e-5, atol=1e-6)


def test_grid_accuracy_is_each_classifiers_own_top1_and_top5():
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, generator=g)  # 3 classifiers, 7 classes
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 7, (40,), generator=g)
    top1, top5 = grid_accuracy(Grid(weight, bias, [(0.1, 0.0)] * 3), x, y, chunk=16)  # chunks of 16, 16, 8 rows
    for k in range(3):
        ranked = (x @ weight[k].T + bias[k]).argsort(dim=1, descending=True)
        assert top1[k].item() == pytest.approx(100 * (ranked[:, 0] == y).float().mean().item())
        assert top5[k].item() == pytest.approx(100 * (ranked[:, :5] == y[:, None]).any(1).float().mean().item())
    assert len(set(top1.tolist())) > 1  # the classifiers differ: a mix-up of their rows would show


def test_standardized_training_is_training_on_features_standardized_by_the_training_rows():
    g = torch.Generator().manual_seed(1)
    scale, offset = torch.rand(9, generator=g) * 0.1, torch.randn(9, generator=g) * 3  # a few dominant offsets
    views, labels = torch.randn(2, 31, 9, generator=g) * scale + offset, torch.randint(0, 4, (31,), generator=g)
    rows = np.arange(0, 31, 2)
    args = dict(lrs=(0.5, 5.0), wds=(0.0,), num_classes=4, epochs=2, batch_size=6, seed=1)
    grid = train_grid(views, labels, rows, standardize=True, **args)
    fit = views[:, rows].reshape(-1, 9)
    mean, std = fit.mean(0), fit.std(0, unbiased=False)
    torch.testing.assert_close(grid.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid.inv_std, 1 / std, rtol=1e-4, atol=1e-4)
    plain = train_grid((views - mean) / std, labels, rows, **args)
    torch.testing.assert_close(grid.weight, plain.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grid.bias, plain.bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grid.inputs(views[0]), (views[0] - mean) / std, rtol=1e-4, atol=1e-4)  # scoring


def _separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (2, N, 16) of 4 classes around well separated means, labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat(n_per_class)
    means = 3.0 * torch.eye(4, 16)[labels]
    return means + 0.3 * torch.randn(2, len(labels), 16, generator=g), labels


def test_the_sweep_separates_separable_features_and_picks_a_learning_rate_that_learns():
    train_views, train_y = _separable(30, seed=0)
    val_views, val_y = _separable(10, seed=1)
    sweep = SweepSettings(lrs=(1e-7, 0.3, 3.0), wds=(0.0, 1e-4), epochs=15, batch_size=16, holdout_fraction=0.2)
    results = fit_and_score(train_views, train_y, val_views, val_y, 4, sweep)
    best, grid = results["best"], results["grid"]
    assert best["lr"] != 1e-7 and best["holdout_top1"] == 100.0 and best["top1"] >= 99.0
    assert max(r["holdout_top1"] for r in grid if r["lr"] == 1e-7) < 60.0  # too small to move from the init
    assert (results["train_samples"], results["holdout_samples"], results["val_samples"]) == (96, 24, 40)
    assert len(grid) == 6 and [(r["lr"], r["wd"]) for r in grid][:2] == [(1e-7, 0.0), (1e-7, 1e-4)]


def test_the_held_out_split_is_disjoint_stratified_and_seeded():
    labels = np.array([0] * 20 + [1] * 7 + [2] * 1 + [3] * 2 + [4] * 13)[np.random.default_rng(0).permutation(43)]
    fit, held = holdout_split(labels, 0.1, seed=4)
    assert len(np.intersect1d(fit, held)) == 0 and np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(43))
    assert np.bincount(labels[held], minlength=5).tolist() == [2, 1, 0, 1, 1]  # round(10%), >= 1 unless alone
    again = holdout_split(labels, 0.1, seed=4)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(labels, 0.1, seed=5)[1], held)


def test_the_feature_cache_is_refused_with_several_processes(betons, tmp_path):
    from mugs_fast.linear import LinearProbeError, linear_probe

    with pytest.raises(LinearProbeError, match="single process"):
        linear_probe(_backbone(depth=2), "vit_tiny", *betons, feature_cache=tmp_path, world_size=2)


def test_too_few_images_to_hold_out_is_an_error():
    from mugs_fast.linear import LinearProbeError

    views, labels = torch.randn(1, 3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(LinearProbeError, match="too few"):
        fit_and_score(views, labels, views, labels, 3, SweepSettings(epochs=1))


# ---- backbone files ----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of ours (a 2-block ViT-Ti on 32 px) whose teacher and student differ from their init."""
    root = tmp_path_factory.mktemp("linear_ckpt")
    cfg = small_cfg(**SMALL_HEADS)
    torch.manual_seed(0)
    model = Mugs(cfg)
    _perturb(model.teacher, seed=1)
    _perturb(model.student, seed=2)
    path = root / "checkpoint.pth"
    atomic_save({**release_entries(model), "config": cfg.to_dict(), "step": 7}, path)
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_backbones_load_from_ours_the_releases_layout_and_exports(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    teacher, student = (backbone_from_checkpoint(ckpt, key=k) for k in ("teacher", "student"))
    ours, arch, recipe = load_backbone(checkpoint)
    assert arch == "vit_tiny" and recipe == "tiny" and _same_weights(ours, teacher)
    assert _same_weights(load_backbone(checkpoint, "student")[0], student)
    # the release: no config, an argparse.Namespace under `args`, the student's keys prefixed `module.`
    release = tmp_path / "release.pth"
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, epochs=3)
    torch.save({"teacher": ckpt["teacher"], "student": ckpt["student"], "epoch": 3, "args": args}, release)
    assert _same_weights(load_backbone(release)[0], teacher) and load_backbone(release).recipe == "vit_tiny_3ep"
    assert _same_weights(load_backbone(release, "student")[0], student)
    export(checkpoint, tmp_path / "export", verify=False)
    for name in ("vit_tiny_backbone.safetensors", "vit_tiny_backbone.pth"):
        assert _same_weights(load_backbone(tmp_path / "export" / name)[0], teacher), name


@pytest.mark.parametrize("problem", ["garbage", "no_backbone", "unknown_width", "wrong_arch", "missing_key"])
def test_files_that_hold_no_usable_backbone_are_one_line_errors(checkpoint, tmp_path, problem):
    path = tmp_path / "bad.pth"
    state = {k: v for k, v in load_backbone(checkpoint)[0].state_dict().items()}
    arch = None
    if problem == "garbage":
        path.write_bytes(b"not a zip file")
    elif problem == "no_backbone":
        torch.save({"model": {"linear.weight": torch.zeros(2, 2)}}, path)
    elif problem == "unknown_width":
        save_file({"cls_token": torch.zeros(1, 1, 100)}, path.with_suffix(".safetensors"))
        path = path.with_suffix(".safetensors")
    elif problem == "wrong_arch":
        torch.save({"state_dict": state}, path)
        arch = "vit_small"
    else:
        del state["blocks.1.mlp.fc2.bias"]
        torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path, arch=arch)
    assert "\n" not in str(e.value)


# ---- the CLI ----


def _run(checkpoint, betons, tmp_path, *extra) -> tuple[int, dict | None]:
    out = tmp_path / "linear.json"
    args = [str(checkpoint), "--train", str(betons[0]), "--val", str(betons[1]), "--out", str(out), "--epochs", "3"]
    code = main(args + ["--num_workers", "1", "--holdout_fraction", "0.25", *extra])
    return code, json.loads(out.read_text()) if code == 0 and out.exists() else None


def test_cli_reports_the_grid_and_reuses_its_feature_cache(checkpoint, betons, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, results = _run(
        checkpoint, betons, tmp_path, "--lrs", "0.01", "0.1", "--wds", "0", "--feature_cache", str(cache)
    )
    assert code == 0 and len(results["grid"]) == 2 and results["best"] in results["grid"]
    assert results["features"]["n_last_blocks"] == 2  # ViT-Ti's 4 of the recipe, cut to the 2 blocks there are
    assert results["features"]["cache_hit"] is False and results["arch"] == "vit_tiny"
    assert results["val_samples"] == 11 and results["train_samples"] + results["holdout_samples"] == 37
    printed = capsys.readouterr().out
    assert "best on held-out train" in printed and printed.count("\n* ") == 1
    code, again = _run(
        checkpoint, betons, tmp_path, "--lrs", "0.01", "0.1", "--wds", "0", "--feature_cache", str(cache)
    )
    assert code == 0 and again["features"]["cache_hit"] is True and again["grid"] == results["grid"]


def test_cli_recipe_defaults_follow_the_architecture(checkpoint, betons, tmp_path):
    code, results = _run(checkpoint, betons, tmp_path, "--n_last_blocks", "2", "--lrs", "0.1", "--wds", "0")
    assert code == 0 and results["features"]["dim"] == 2 * 192 and not results["features"]["avgpool_patchtokens"]
    assert results["sweep"]["standardize"] is True
    code, results = _run(checkpoint, betons, tmp_path, "--n_last_blocks", "1", "--avgpool_patchtokens", "true",
                         "--standardize", "false")  # fmt: skip
    assert code == 0 and results["features"]["dim"] == 2 * 192 and len(results["grid"]) == 20
    assert results["sweep"]["standardize"] is False


@pytest.mark.parametrize("problem", ["wrong_arch", "classes_differ", "more_val_classes", "unreadable", "missing_beton",
                                     "too_many_blocks"])  # fmt: skip
def test_cli_errors_are_one_line_with_status_1(checkpoint, betons, tmp_path, capsys, problem):
    train, val = betons
    extra = []
    if problem == "wrong_arch":
        extra = ["--arch", "vit_small"]
    elif problem in ("classes_differ", "more_val_classes"):
        train, val = (write_beton(tmp_path / f"{s}.beton", 12, seed=3) for s in ("train", "val"))
        names = [f"class{i}" for i in range(5)]
        sidecar_path(train, "classes").write_text(json.dumps(names))
        other = names[:3] + ["zebra", "class4"] if problem == "classes_differ" else names + ["class5"]
        sidecar_path(val, "classes").write_text(json.dumps(other))
    elif problem == "unreadable":
        checkpoint = tmp_path / "garbage.pth"
        checkpoint.write_bytes(b"\x00" * 100)
    elif problem == "missing_beton":
        val = tmp_path / "nope.beton"
    else:
        extra = ["--n_last_blocks", "3"]
    assert _run(checkpoint, (train, val), tmp_path, *extra)[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("mugs-linear: error:") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--holdout_fraction", "1"], ["--lrs", "0"], ["--epochs", "0"], ["--mode", "x"]])
def test_cli_usage_errors_exit_2(checkpoint, betons, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        _run(checkpoint, betons, tmp_path, *flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("mugs-linear: error:") and err.count("\n") == 1


# ---- augmented mode ----


@pytest.fixture(scope="module")
def builtin_betons(tmp_path_factory):
    """The built-in dataset (data_prep synth), small: 10 classes, 4 train and 2 val images each, as .beton files."""
    from data_prep.convert import convert
    from data_prep.synth import write_dataset

    root = tmp_path_factory.mktemp("linear_builtin")
    data = write_dataset(root / "data", train_per_class=4, val_per_class=2, min_size=48, max_size=64, workers=1)
    for split in ("train", "val"):
        convert(data.root / split, root / f"{split}.beton", workers=1, progress=False)
    return root / "train.beton", root / "val.beton"


def _augmented(checkpoint, betons, out_dir, *extra) -> tuple[int, dict | None]:
    out = out_dir / "linear.json"
    args = [str(checkpoint), "--train", str(betons[0]), "--val", str(betons[1]), "--mode", "augmented"]
    args += ["--epochs", "2", "--batch_size", "8", "--num_workers", "1", "--output_dir", str(out_dir / "run")]
    code = main(args + ["--out", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_augmented_mode_stopped_and_resumed_ends_as_a_run_that_was_not(checkpoint, builtin_betons, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, results = _augmented(checkpoint, builtin_betons, straight)
    assert code == 0 and results["mode"] == "augmented" and results["resumed_from_epoch"] == 0
    assert results["train_samples"] == 40 and results["val_samples"] == 20 and results["num_classes"] == 10
    assert 0 <= results["top1"] <= results["top5"] <= 100 and results["lr"] == 0.015  # the tiny recipe: as ViT-S
    assert results["effective_lr"] == 0.015 * 8 / 256

    assert _augmented(checkpoint, builtin_betons, resumed, "--max_steps", "7") == (0, None)  # 5 steps an epoch
    assert "run the same command to continue" in capsys.readouterr().out
    assert torch.load(resumed / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 1  # the finished epoch
    code, again = _augmented(checkpoint, builtin_betons, resumed)
    assert code == 0 and again["resumed_from_epoch"] == 1
    a, b = (torch.load(d / "run" / "checkpoint.pth", weights_only=True) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2
    for key in ("weight", "bias"):
        assert torch.equal(a["classifier"][key], b["classifier"][key]), key
    assert (again["top1"], again["top5"]) == (results["top1"], results["top5"])


def test_augmented_mode_refuses_a_directory_holding_another_run(checkpoint, builtin_betons, tmp_path, capsys):
    assert _augmented(checkpoint, builtin_betons, tmp_path, "--max_steps", "1")[0] == 0
    assert "no epoch finished yet: nothing saved" in capsys.readouterr().out
    assert _augmented(checkpoint, builtin_betons, tmp_path, "--max_steps", "6")[0] == 0
    assert "1 epoch(s) saved" in capsys.readouterr().out
    assert _augmented(checkpoint, builtin_betons, tmp_path, "--lr", "0.5")[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("mugs-linear: error:") and "other settings (lr)" in err and err.count("\n") == 1


def test_augmented_mode_under_torchrun_counts_every_val_image_once_and_exits_cleanly(
    checkpoint, builtin_betons, tmp_path
):
    # 2 gloo processes of 4 images: each rank holds 10 of the 20 val images in 3 batches, the last one padded.
    # Exit status 0 also says that no rank aborted at exit after the last collective (mugs_fast.distributed.settle).
    out = tmp_path / "linear.json"
    args = [str(checkpoint), "--train", str(builtin_betons[0]), "--val", str(builtin_betons[1]), "--mode", "augmented"]
    args += ["--epochs", "1", "--batch_size", "4", "--num_workers", "1", "--output_dir", str(tmp_path / "run")]
    proc = start([*torchrun(2), "-m", "mugs_fast.linear", *args, "--out", str(out)])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count(f"saved {out}") == 1  # rank 0 alone reports
    results = json.loads(out.read_text())
    assert results["world_size"] == 2 and results["val_samples"] == 20 and results["train_samples"] == 40
    assert results["effective_lr"] == 0.015 * 4 * 2 / 256 and 0 <= results["top1"] <= results["top5"] <= 100


def test_augmented_loader_draws_the_same_strong_crops_for_the_same_seed_and_epoch(builtin_betons):
    from mugs_fast.data.linear_loader import AugmentedLoader

    loader = AugmentedLoader(builtin_betons[0], 8, size=32, device="cpu", seed=3, num_threads=1)
    epochs = []
    for epoch in (0, 0, 1):
        loader.set_epoch(epoch)
        epochs.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(epochs[0]) == 5 and epochs[0][0][0].shape == (8, 3, 32, 32)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epochs[0], epochs[1], strict=True))
    assert not torch.equal(epochs[0][0][0], epochs[2][0][0])


def test_augmented_loader_replaces_names_and_counts_undecodable_samples(tmp_path):
    from mugs_fast.data.linear_loader import AugmentedLoader

    path = write_beton(tmp_path / "damaged.beton", 16, corrupt={3: b"not a jpeg", 11: b"\xff\xd8 cut short"})
    loader = AugmentedLoader(path, 8, size=32, device="cpu", seed=0, num_threads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    named = sorted(int(str(w.message).split("sample ")[1].split()[0]) for w in caught)
    assert named == [3, 11] and sorted(loader.corrupt_samples) == [3, 11] and loader.num_replaced == 2
    assert sum(len(y) for _, y in batches) == 16 and loader.state_dict()["corrupt"].keys() == {3, 11}
    every_one_bad = write_beton(tmp_path / "all_bad.beton", 4, corrupt=dict.fromkeys(range(4), b"not a jpeg"))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="found no decodable sample"):
        list(AugmentedLoader(every_one_bad, 4, size=32, device="cpu", seed=0, num_threads=1))


def test_release_learning_rates_and_batches_follow_the_recipes():
    from mugs_fast.linear_augmented import release_batch, release_lr

    assert [release_lr("vit_small", r) for r in ("vit_small_100ep", "vit_small_300ep", "vit_small_800ep")] == [
        0.015,
        0.02,
        0.01,
    ]
    assert release_lr("vit_base", "vit_base_400ep") == release_lr("vit_large") == 0.002
    assert release_lr("vit_tiny", "tiny") == 0.015 and (release_batch("vit_small"), release_batch("vit_base")) == (
        256,
        128,
    )


# ---- on a GPU ----


@pytest.mark.gpu
def test_both_modes_run_on_the_gpu_in_bf16(checkpoint, betons, builtin_betons, tmp_path):
    code, results = _run(checkpoint, betons, tmp_path, "--lrs", "0.1", "--wds", "0")
    assert code == 0 and results["features"]["dtype"] == "bfloat16"
    assert 0 <= results["best"]["top1"] <= results["best"]["top5"] <= 100
    code, results = _augmented(checkpoint, builtin_betons, tmp_path)
    assert code == 0 and results["features"]["dtype"] == "bfloat16" and results["val_samples"] == 20
