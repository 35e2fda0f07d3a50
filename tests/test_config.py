import dataclasses
import os
from pathlib import Path

import pytest

from mugs_fast import config
from mugs_fast import engine as train_cli
from mugs_fast.config import FIELD_CHECKS, RECIPES, MugsConfig, build_parser, parse_config, recipe


def test_defaults_are_the_releases():
    c = MugsConfig()
    assert (c.arch, c.patch_size, c.momentum_teacher) == ("vit_small", 16, 0.996)
    assert (c.weight_decay, c.weight_decay_end, c.clip_grad, c.batch_size_per_gpu) == (0.04, 0.2, 3.0, 64)
    assert (c.epochs, c.warmup_epochs, c.freeze_last_layer, c.lr, c.min_lr) == (100, 10, 1, 0.0008, 1e-6)
    assert (c.patch_embed_lr_mult, c.optimizer, c.drop_path_rate, c.loss_weights) == (0.2, "adamw", 0.1, (1, 1, 1))
    assert (c.instance_queue_size, c.local_group_queue_size, c.local_group_knn_top_n) == (65536, 65536, 8)
    assert (c.instance_temp, c.local_group_temp, c.group_student_temp) == (0.2, 0.2, 0.1)
    assert (c.group_out_dim, c.group_bottleneck_dim, c.norm_last_layer, c.norm_before_pred) == (65536, 256, True, True)
    assert (c.group_warmup_teacher_temp, c.group_teacher_temp, c.group_warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (c.global_crops_scale, c.local_crops_scale, c.local_crops_number, c.size_crops) == (
        (0.25, 1.0),
        (0.05, 0.25),
        10,
        (96,),
    )
    assert (c.prob, c.re_prob, c.timm_auto_augment_par) == (0.5, 0.25, "rand-m9-mstd0.5-inc1")
    assert (c.precision, c.official_memory_pointer, c.global_crop_size) == ("bf16", False, 224)


def test_released_recipes():
    s100, s300, s800 = recipe("vit_small_100ep"), recipe("vit_small_300ep"), recipe("vit_small_800ep")
    assert s100.norm_last_layer is False and s100.epochs == 100 and s100.group_teacher_temp == 0.04
    for c, epochs in ((s300, 300), (s800, 800)):
        assert (c.epochs, c.group_teacher_temp, c.group_warmup_teacher_temp_epochs, c.weight_decay_end) == (
            epochs,
            0.07,
            30,
            0.1,
        )
    b = recipe("vit_base_400ep")
    assert (b.arch, b.batch_size_per_gpu, b.min_lr, b.freeze_last_layer, b.norm_last_layer) == (
        "vit_base",
        42,
        2e-6,
        3,
        False,
    )
    assert (b.group_teacher_temp, b.group_warmup_teacher_temp_epochs, b.weight_decay_end, b.epochs) == (
        0.07,
        50,
        0.1,
        400,
    )
    lg = recipe("vit_large_250ep")
    assert (lg.arch, lg.batch_size_per_gpu, lg.lr, lg.min_lr, lg.drop_path_rate) == (
        "vit_large",
        16,
        0.0015,
        1.5e-4,
        0.3,
    )
    assert (lg.weight_decay, lg.weight_decay_end, lg.norm_last_layer, lg.freeze_last_layer) == (0.025, 0.08, True, 3)
    assert all(recipe(n).recipe == n for n in RECIPES)


def test_recipe_overrides_and_errors():
    assert recipe("tiny", lr=0.01).lr == 0.01
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("vit_huge")
    with pytest.raises(ValueError, match="unknown config field"):
        recipe("tiny", learning_rate=0.1)
    with pytest.raises(ValueError, match="loss_weights"):
        MugsConfig(loss_weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="arch"):
        MugsConfig(arch="resnet50")
    with pytest.raises(ValueError, match="must be a multiple of --patch_size"):
        MugsConfig(size_crops=(100,))


def test_parser_covers_every_field():
    options = {s for a in build_parser()._actions for s in a.option_strings}
    assert {f"--{f.name}" for f in dataclasses.fields(MugsConfig)} <= options


def test_parse_recipe_then_explicit_flags():
    cfg = parse_config(
        ["--recipe", "vit_large_250ep", "--drop_path_rate", "0.1", "--norm_last_layer", "false"]
        + ["--loss_weights", "1", "0", "1", "--global_crops_scale", "0.3", "1", "--official_memory_pointer", "True"]
    )
    assert cfg.recipe == "vit_large_250ep" and cfg.arch == "vit_large" and cfg.lr == 0.0015  # from the recipe
    assert cfg.drop_path_rate == 0.1 and cfg.norm_last_layer is False  # explicit flags win, even at the default
    assert cfg.loss_weights == (1.0, 0.0, 1.0) and cfg.global_crops_scale == (0.3, 1.0)
    assert cfg.official_memory_pointer is True
    assert parse_config([]) == MugsConfig()


def test_parse_release_command_line(capsys):
    # flags as the release's pretraining.sh and torch.distributed.launch pass them
    argv = "--local_rank=3 --arch vit_small --use_fp16 false --dist_url env:// --use_prefetcher True".split()
    cfg = parse_config(argv + ["--data_path", "/data/train", "--group_bottleneck_dim", "256"])
    assert cfg.data_path == "/data/train" and cfg.group_bottleneck_dim == 256
    assert cfg == MugsConfig(data_path="/data/train")  # the release-only flags are dropped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "note: --dist_url, --local_rank, --use_prefetcher, --use_fp16:" in err[0]
    assert parse_config(["--local-rank=2"]) == MugsConfig()  # torch.distributed.launch's spelling since torch 2.0
    assert "--local_rank" in capsys.readouterr().err
    parse_config(["--lr", "0.001"])
    assert capsys.readouterr().err == ""  # no note without such a flag


def test_release_only_flags_are_no_fields_and_old_configs_load():
    fields = {f.name for f in dataclasses.fields(MugsConfig)}
    assert not fields & set(config.RELEASE_ONLY_FLAGS)
    saved = {**MugsConfig().to_dict(), "dist_url": "env://", "local_rank": 0, "use_fp16": False, "strong_ratio": 0.45}
    assert MugsConfig.from_dict(saved) == MugsConfig()  # a config.json of an earlier version
    with pytest.raises(ValueError, match="unknown config field"):
        MugsConfig().replace(use_fp16=False)  # the Python API has no such field


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--local_crops_n", "4"], "unrecognized arguments"),  # no abbreviations
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--epochs", "1.5"], "argument --epochs: invalid int value"),
        (["--norm_last_layer", "maybe"], "invalid boolean value 'maybe'"),
        (["--arch", "vit_huge"], "argument --arch: invalid choice"),
        (["--recipe", "nope"], "argument --recipe: invalid choice"),
        (["--loss_weights", "0", "0", "0"], "--loss_weights 0.0 0.0 0.0: must be 3 non-negative numbers"),
        (["--use_fp16", "true"], "--use_fp16 true: is not supported"),
        (
            ["--epochs", "5", "--warmup_epochs", "1", "--group_warmup_teacher_temp_epochs", "30"],
            "--group_warmup_teacher_temp_epochs 30: must not exceed --epochs (5)",
        ),
    ],
)
def test_parse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, "a usage error is one line"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_round_trip(name):
    cfg = recipe(name, seed=7)
    assert MugsConfig.from_json(cfg.to_json()) == cfg
    assert MugsConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_config(["--recipe", name, "--seed", "7"]) == cfg


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown config field"):
        MugsConfig.from_dict({"lr": 0.1, "not_a_flag": 1})


# A bad value of every field that has a range, and each relation between fields: (overrides, the flag named).
INF, NAN = float("inf"), float("nan")
BAD_VALUES = [
    (dict(patch_size=0), "patch_size"),
    (dict(momentum_teacher=1.01), "momentum_teacher"),
    (dict(momentum_teacher=-0.1), "momentum_teacher"),
    (dict(weight_decay=-0.04), "weight_decay"),
    (dict(weight_decay_end=-0.2), "weight_decay_end"),
    (dict(clip_grad=-3.0), "clip_grad"),
    (dict(batch_size_per_gpu=0), "batch_size_per_gpu"),
    (dict(epochs=0), "epochs"),
    (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(freeze_last_layer=-1), "freeze_last_layer"),
    (dict(lr=-0.0008), "lr"),
    (dict(lr=0.0), "lr"),
    (dict(lr=INF), "lr"),
    (dict(lr=NAN), "lr"),
    (dict(patch_embed_lr_mult=-0.2), "patch_embed_lr_mult"),
    (dict(min_lr=-1e-6), "min_lr"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(drop_path_rate=-0.1), "drop_path_rate"),
    (dict(loss_weights=(1.0, -1.0, 1.0)), "loss_weights"),
    (dict(loss_weights=(1.0, 1.0)), "loss_weights"),
    (dict(instance_out_dim=0), "instance_out_dim"),
    (dict(instance_queue_size=0), "instance_queue_size"),
    (dict(instance_temp=0.0), "instance_temp"),
    (dict(local_group_out_dim=0), "local_group_out_dim"),
    (dict(local_group_knn_top_n=0), "local_group_knn_top_n"),
    (dict(local_group_queue_size=0), "local_group_queue_size"),
    (dict(local_group_temp=-0.2), "local_group_temp"),
    (dict(group_out_dim=0), "group_out_dim"),
    (dict(group_bottleneck_dim=0), "group_bottleneck_dim"),
    (dict(group_student_temp=0.0), "group_student_temp"),
    (dict(group_warmup_teacher_temp=0.0), "group_warmup_teacher_temp"),
    (dict(group_teacher_temp=-0.04), "group_teacher_temp"),
    (dict(group_warmup_teacher_temp_epochs=-1), "group_warmup_teacher_temp_epochs"),
    (dict(global_crops_scale=(0.5, 0.25)), "global_crops_scale"),
    (dict(global_crops_scale=(0.0, 1.0)), "global_crops_scale"),
    (dict(local_crops_number=-1), "local_crops_number"),
    (dict(local_crops_scale=(0.05, 1.5)), "local_crops_scale"),
    (dict(size_crops=(0,)), "size_crops"),
    (dict(size_crops=(96, 64)), "size_crops"),
    (dict(color_aug=True), "color_aug"),
    (dict(vanilla_weak_augmentation=True), "vanilla_weak_augmentation"),
    (dict(timm_auto_augment_par="rand-m9-mstd0.5"), "timm_auto_augment_par"),
    (dict(re_prob=1.25), "re_prob"),
    (dict(prob=-0.5), "prob"),
    (dict(output_dir=""), "output_dir"),
    (dict(saveckp_freq=-1), "saveckp_freq"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(num_workers=0), "num_workers"),
    (dict(recipe="vit_huge"), "recipe"),
    (dict(precision="fp16"), "precision"),
    (dict(global_crop_size=0), "global_crop_size"),
    (dict(depth=-1), "depth"),
    (dict(head_hidden_dim=0), "head_hidden_dim"),
    (dict(pred_hidden_dim=0), "pred_hidden_dim"),
    (dict(max_steps=-1), "max_steps"),
    (dict(log_freq=0), "log_freq"),
    (dict(checkpoint_minutes=-1.0), "checkpoint_minutes"),
    (dict(knn_freq=-1), "knn_freq"),
    (dict(collective_timeout_minutes=0.0), "collective_timeout_minutes"),
    (dict(arch="vit_huge"), "arch"),
    # relations between fields: the error names the flag to change
    (dict(lr=0.001, min_lr=0.01), "min_lr"),
    (dict(epochs=5, warmup_epochs=6), "warmup_epochs"),
    (dict(epochs=5, warmup_epochs=0, group_warmup_teacher_temp_epochs=6), "group_warmup_teacher_temp_epochs"),
    (dict(epochs=2, warmup_epochs=0, freeze_last_layer=3), "freeze_last_layer"),
    (dict(global_crop_size=100), "global_crop_size"),
    (dict(size_crops=(40,)), "size_crops"),
    (dict(local_group_queue_size=4), "local_group_knn_top_n"),
    (dict(linear_eval=True), "linear_eval"),  # without --val_path
]


def _argv(overrides: dict) -> list[str]:
    """The command-line flags giving `overrides`."""
    out = []
    for key, value in overrides.items():
        values = value if isinstance(value, tuple) else (value,)
        out += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return out


def _case_id(case: tuple[dict, str]) -> str:
    return " ".join(_argv(case[0]))


@pytest.mark.parametrize("overrides, flag", BAD_VALUES, ids=map(_case_id, BAD_VALUES))
def test_bad_value_is_a_one_line_usage_error_naming_the_flag(overrides, flag, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"^--{flag} "):  # the library: MugsConfig, recipe(), replace()
        MugsConfig(**overrides)
    out = tmp_path / "run"
    argv = ["--synthetic", "true", "--output_dir", str(out), *_argv(overrides)]
    with pytest.raises(SystemExit) as e:
        train_cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"a usage error is one line: {err}"
    assert err.startswith("mugs: error: ") and (f" --{flag} " in err or f" --{flag}:" in err), err
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_every_field_has_a_check_and_every_range_a_test():
    assert set(FIELD_CHECKS) == {f.name for f in dataclasses.fields(MugsConfig)}
    ranged = {name for name, check in FIELD_CHECKS.items() if check is not config._anything}
    assert ranged <= {flag for _, flag in BAD_VALUES}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(epochs=1.5), "--epochs 1.5: must be an integer"),
        (dict(epochs=True), "--epochs True: must be an integer"),
        (dict(lr="0.1"), "--lr '0.1': must be a finite number"),
        (dict(use_bn_in_head="false"), "--use_bn_in_head 'false': must be true or false"),
        (dict(size_crops=[96]), r"--size_crops \[96\]: must be a tuple of integers"),
        (
            dict(global_crops_scale=(0.25, NAN)),
            r"--global_crops_scale \(0.25, nan\): must be a tuple of finite numbers",
        ),
        (dict(data_path=None), "--data_path None: must be a string"),
    ],
)
def test_values_of_the_wrong_type_are_refused(overrides, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        recipe("tiny", **overrides)


def test_valid_edges_are_accepted():
    cfg = MugsConfig(
        momentum_teacher=1.0, clip_grad=0.0, local_crops_number=0, drop_path_rate=0.0, lr=1, min_lr=1, seed=2**32 - 1
    )
    assert cfg.lr == cfg.min_lr == 1 and cfg.local_crops_number == 0
    assert MugsConfig(epochs=10, warmup_epochs=10, freeze_last_layer=10).freeze_last_layer == 10
    assert MugsConfig(loss_weights=(0.0, 0.0, 1.0), local_crops_scale=(0.25, 0.25)).use_group


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train_cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_output_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    err = _usage_error(["--synthetic", "true", "--output_dir", str(file)], capsys)
    assert f"--output_dir {file}: is not a directory" in err
    err = _usage_error(["--synthetic", "true", "--output_dir", str(file / "run")], capsys)
    assert f"--output_dir {file / 'run'}: its parent {file} is not a directory" in err
    assert list(tmp_path.iterdir()) == [file] and file.read_text() == "not a folder"


def test_output_dir_that_is_not_writable_is_a_usage_error(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    real_access = os.access
    # root writes through permission bits: there, pretend it cannot (as any other user could not)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    err = _usage_error(["--synthetic", "true", "--output_dir", str(locked / "a" / "run")], capsys)
    assert f"--output_dir {locked / 'a' / 'run'}: its parent {locked} is not writable" in err
    err = _usage_error(["--synthetic", "true", "--output_dir", str(locked)], capsys)
    assert f"--output_dir {locked}: is not writable" in err
    assert list(locked.iterdir()) == []
