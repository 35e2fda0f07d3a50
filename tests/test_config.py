import dataclasses

import pytest

from mugs_fast.config import RECIPES, MugsConfig, build_parser, parse_config, recipe


def test_defaults_are_the_releases():
    c = MugsConfig()
    assert (c.arch, c.patch_size, c.momentum_teacher, c.use_fp16) == ("vit_small", 16, 0.996, False)
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
    with pytest.raises(ValueError, match="multiples of patch_size"):
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


def test_parse_release_command_line():
    # flags as the release's pretraining.sh and torch.distributed.launch pass them
    argv = "--local_rank=3 --arch vit_small --use_fp16 false --dist_url env:// --use_prefetcher True".split()
    cfg = parse_config(argv + ["--data_path", "/data/train", "--group_bottleneck_dim", "256"])
    assert cfg.local_rank == 3 and cfg.use_fp16 is False and cfg.data_path == "/data/train"
    assert parse_config(["--local-rank=2"]).local_rank == 2  # torch.distributed.launch's spelling since torch 2.0


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
        (["--loss_weights", "0", "0", "0"], "loss_weights must be"),
        (["--use_fp16", "true"], "use_fp16 is not supported"),
        (
            ["--epochs", "5", "--warmup_epochs", "1", "--group_warmup_teacher_temp_epochs", "30"],
            "group_warmup_teacher_temp_epochs (30) must not exceed epochs (5)",
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
