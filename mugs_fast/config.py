"""Options of a Mugs run: one dataclass named after the release's flags, named recipes, a generated parser.

The fields up to `num_workers` are the release's `main.py` arguments with the release's defaults (spec section
1), but for those that mean nothing here (`RELEASE_ONLY_FLAGS`: accepted on the command line and dropped with one
note); the fields after them are this project's additions. `recipe(name)` gives the five released runs and `tiny`.
Every config is checked when it is built (`FIELD_CHECKS`, `config_problem`): a bad value is a ValueError that
names its flag, and a one-line usage error (exit status 2) on the command line.
"""

import argparse
import dataclasses
import functools
import json
import math
import numbers
import os
import shlex
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCH_CHOICES = ("vit_tiny", "vit_small", "vit_base", "vit_large")
OPTIMIZER_CHOICES = ("adamw", "sgd", "lars")
PRECISION_CHOICES = ("bf16", "fp32")


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its command-line help (and choices) as metadata."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class MugsConfig:
    # ---- the release's arguments (main.py:get_args_parser), same names and defaults ----
    arch: str = _opt("vit_small", "backbone", ARCH_CHOICES)
    patch_size: int = _opt(16, "patch size of the ViT")
    momentum_teacher: float = _opt(0.996, "base EMA momentum of the teacher (cosine schedule to 1)")
    weight_decay: float = _opt(0.04, "start of the cosine weight-decay schedule")
    weight_decay_end: float = _opt(0.2, "end of the cosine weight-decay schedule")
    clip_grad: float = _opt(3.0, "per-tensor gradient-norm clip (0 disables; /10 for vit_large after epoch 100)")
    batch_size_per_gpu: int = _opt(64, "images per GPU (per process)")
    epochs: int = _opt(100, "training epochs (the length of every schedule)")
    warmup_epochs: int = _opt(10, "linear learning-rate warm-up epochs")
    freeze_last_layer: int = _opt(1, "epochs during which the group head's last layer is not updated")
    lr: float = _opt(0.0008, "base learning rate for a global batch of 256 (peak = lr * global batch / 256)")
    patch_embed_lr_mult: float = _opt(0.2, "learning-rate multiplier of the patch embedding")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine schedule")
    optimizer: str = _opt("adamw", "optimizer", OPTIMIZER_CHOICES)
    drop_path_rate: float = _opt(0.1, "stochastic depth of the student (the teacher has none)")
    loss_weights: tuple[float, ...] = _opt(
        (1.0, 1.0, 1.0), "weights of the instance, local-group and group losses; 0 switches one off"
    )
    use_bn_in_head: bool = _opt(False, "BatchNorm in the projectors of the three heads")
    norm_before_pred: bool = _opt(True, "L2-normalise the student projection before its predictor")
    instance_out_dim: int = _opt(256, "output width of the instance head")
    instance_queue_size: int = _opt(65536, "negatives in the instance InfoNCE queue")
    instance_temp: float = _opt(0.2, "instance InfoNCE temperature")
    local_group_out_dim: int = _opt(256, "output width of the local-group head")
    local_group_knn_top_n: int = _opt(8, "neighbours retrieved from the local-group memory")
    local_group_queue_size: int = _opt(65536, "local-group InfoNCE queue size and size of each feature memory")
    local_group_temp: float = _opt(0.2, "local-group InfoNCE temperature")
    group_out_dim: int = _opt(65536, "number of prototypes of the group head")
    group_bottleneck_dim: int = _opt(256, "bottleneck width of the group head")
    norm_last_layer: bool = _opt(True, "freeze the weight-norm gain of the group head's last layer at 1")
    group_student_temp: float = _opt(0.1, "student temperature of the group loss")
    group_warmup_teacher_temp: float = _opt(0.04, "teacher temperature at epoch 0 of the group loss")
    group_teacher_temp: float = _opt(0.04, "teacher temperature of the group loss after warm-up")
    group_warmup_teacher_temp_epochs: int = _opt(0, "epochs of linear teacher-temperature warm-up")
    global_crops_scale: tuple[float, ...] = _opt((0.25, 1.0), "RandomResizedCrop scale of the global crops")
    local_crops_number: int = _opt(10, "local crops per image")
    local_crops_scale: tuple[float, ...] = _opt((0.05, 0.25), "RandomResizedCrop scale of the local crops")
    timm_auto_augment_par: str = _opt("rand-m9-mstd0.5-inc1", "RandAugment policy of the strong augmentation")
    color_aug: bool = _opt(False, "extra colour jitter in the strong augmentation")
    size_crops: tuple[int, ...] = _opt((96,), "local crop size in pixels (one size)")
    re_prob: float = _opt(0.25, "RandomErasing probability of the strong augmentation")
    vanilla_weak_augmentation: bool = _opt(False, "student global crops are copies of the teacher's (DINO-like)")
    prob: float = _opt(0.5, "a student crop is strong with probability 1 - prob")
    data_path: str = _opt("", "training data (.beton)")
    output_dir: str = _opt("./exp/", "run directory: logs, checkpoints, resolved config")
    saveckp_freq: int = _opt(50, "keep a numbered checkpoint every this many epochs")
    seed: int = _opt(0, "random seed (the same on every rank)")
    num_workers: int = _opt(12, "data-loading worker threads per process")
    # ---- this project's additions ----
    recipe: str = _opt("", "name of the recipe this config started from (informational)")
    precision: str = _opt(
        "bf16", "bf16: autocast on CUDA, fp32 buffers and losses; fp32: as the release", PRECISION_CHOICES
    )
    official_memory_pointer: bool = _opt(False, "advance the local-group memory pointer by 2n, as the release does")
    global_crop_size: int = _opt(224, "global crop size in pixels (also the ViT's native size: pos_embed grid)")
    depth: int = _opt(0, "transformer blocks (0: the architecture's depth)")
    head_hidden_dim: int = _opt(2048, "hidden width of the projectors of the three heads")
    pred_hidden_dim: int = _opt(4096, "hidden width of the student predictors")
    val_path: str = _opt("", "validation data (.beton) for kNN evaluation")
    max_steps: int = _opt(0, "stop after this many optimiser steps in total (0: run all epochs)")
    synthetic: bool = _opt(False, "train on GPU-resident random crops (measures the model alone)")
    compile: bool = _opt(False, "torch.compile the transformer blocks of the student and the teacher")
    log_freq: int = _opt(100, "steps between metric lines")
    checkpoint_minutes: float = _opt(10.0, "also write checkpoint.pth every this many minutes (0: epoch ends only)")
    knn_freq: int = _opt(10, "epochs between kNN evaluations on --val_path (0: only after the last epoch)")
    linear_eval: bool = _opt(False, "after the last epoch, also the fast linear probe on --val_path (mugs-linear)")
    collective_timeout_minutes: float = _opt(
        10.0, "a collective that waits this long for another rank fails the run, naming the rank that did not answer"
    )

    def __post_init__(self) -> None:
        """Every config is checked when it is built (parser, recipe, replace, from_dict): see `config_problem`."""
        problem = config_problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def use_instance(self) -> bool:
        return self.loss_weights[0] > 0

    @property
    def use_local_group(self) -> bool:
        return self.loss_weights[1] > 0

    @property
    def use_group(self) -> bool:
        return self.loss_weights[2] > 0

    def replace(self, **overrides: Any) -> "MugsConfig":
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MugsConfig":
        """Inverse of `to_dict`; fields missing from `d` take their defaults, unknown keys are an error (but
        `RELEASE_ONLY_FLAGS`, which configs saved by earlier versions hold: dropped)."""
        kept = {k: v for k, v in d.items() if k not in RELEASE_ONLY_FLAGS}
        return cls().replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in kept.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MugsConfig":
        return cls.from_dict(json.loads(text))


# ---- what every field accepts ----

Check = Callable[[Any], str | None]  # a value's problem ("must be >= 0"), or None when it is accepted


def _anything(value: Any) -> None:
    """Any value of the field's type."""
    return None


def _at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _above(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def _between(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _one_of(choices: tuple) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def _only(value: Any, what: str) -> Check:
    """An option of the release whose other values the loaders do not implement: refused, not ignored."""
    return lambda v: None if v == value else f"the loaders implement only {flag_text(value)} ({what})"


def _one(check: Check) -> Check:
    """A tuple field that takes exactly one value (nargs="+" for the release's command lines)."""
    return lambda v: f"takes one value, got {len(v)}" if len(v) != 1 else check(v[0])


def _scale(v: tuple[float, ...]) -> str | None:
    ok = len(v) == 2 and 0 < v[0] <= v[1] <= 1
    return None if ok else "must be two numbers, 0 < min <= max <= 1"


def _loss_weights(v: tuple[float, ...]) -> str | None:
    ok = len(v) == 3 and min(v) >= 0 and sum(v) > 0
    return None if ok else "must be 3 non-negative numbers, not all 0"


def _recipe(v: str) -> str | None:
    return None if v == "" or v in RECIPES else f"must be empty or one of {', '.join(RECIPES)}"


# One entry per field: a new field needs one (a test checks); the relations between fields are in
# `_relation_problem`. Each field's type is checked first (`_type_problem`).
FIELD_CHECKS: dict[str, Check] = {
    "arch": _one_of(ARCH_CHOICES),
    "patch_size": _at_least(1),
    "momentum_teacher": _between(0, 1),
    "weight_decay": _at_least(0),
    "weight_decay_end": _at_least(0),
    "clip_grad": _at_least(0),  # 0 disables clipping
    "batch_size_per_gpu": _at_least(1),
    "epochs": _at_least(1),
    "warmup_epochs": _at_least(0),
    "freeze_last_layer": _at_least(0),
    "lr": _above(0),
    "patch_embed_lr_mult": _at_least(0),  # 0 freezes the patch embedding
    "min_lr": _at_least(0),
    "optimizer": _one_of(OPTIMIZER_CHOICES),
    "drop_path_rate": lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1",
    "loss_weights": _loss_weights,
    "use_bn_in_head": _anything,
    "norm_before_pred": _anything,
    "instance_out_dim": _at_least(1),
    "instance_queue_size": _at_least(1),  # the engine checks it against the global batch (world size)
    "instance_temp": _above(0),
    "local_group_out_dim": _at_least(1),
    "local_group_knn_top_n": _at_least(1),
    "local_group_queue_size": _at_least(1),
    "local_group_temp": _above(0),
    "group_out_dim": _at_least(1),
    "group_bottleneck_dim": _at_least(1),
    "norm_last_layer": _anything,
    "group_student_temp": _above(0),
    "group_warmup_teacher_temp": _above(0),
    "group_teacher_temp": _above(0),
    "group_warmup_teacher_temp_epochs": _at_least(0),
    "global_crops_scale": _scale,
    "local_crops_number": _at_least(0),
    "local_crops_scale": _scale,
    "timm_auto_augment_par": _only("rand-m9-mstd0.5-inc1", "the release's RandAugment policy"),
    "color_aug": _only(False, "the release's default"),
    "size_crops": _one(_at_least(1)),
    "re_prob": _between(0, 1),
    "vanilla_weak_augmentation": _only(False, "the release's default"),
    "prob": _between(0, 1),
    "data_path": _anything,  # files are checked when the run starts (exit status 1)
    "output_dir": lambda v: None if v else "must not be empty",
    "saveckp_freq": _at_least(0),  # 0: no numbered copies
    "seed": _between(0, 2**32 - 1),  # numpy's global seed
    "num_workers": _at_least(1),
    # this project's additions
    "recipe": _recipe,
    "precision": _one_of(PRECISION_CHOICES),
    "official_memory_pointer": _anything,
    "global_crop_size": _at_least(1),
    "depth": _at_least(0),  # 0: the architecture's depth
    "head_hidden_dim": _at_least(1),
    "pred_hidden_dim": _at_least(1),
    "val_path": _anything,
    "max_steps": _at_least(0),  # 0: all epochs
    "synthetic": _anything,
    "compile": _anything,
    "log_freq": _at_least(1),
    "checkpoint_minutes": _at_least(0),  # 0: at epoch ends only
    "knn_freq": _at_least(0),  # 0: after the last epoch only
    "linear_eval": _anything,
    "collective_timeout_minutes": _above(0),
}


def _type_problem(hint: Any, value: Any) -> str | None:
    """Whether `value` has the field's type: an int is a float, a bool is neither (as on the command line), and
    inf and nan are no numbers (they turn every schedule and loss they reach into inf or nan)."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, tuple) and all(_type_problem(item, v) is None for v in value):
            return None
        return f"must be a tuple of {_ITEM_NAMES[item]}"
    plain = {bool: isinstance(value, bool), str: isinstance(value, str)}.get(hint)
    if plain is None:
        numeric = numbers.Integral if hint is int else numbers.Real
        plain = isinstance(value, numeric) and not isinstance(value, bool) and math.isfinite(value)
    return None if plain else f"must be {_TYPE_NAMES[hint]}"


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
_ITEM_NAMES = {int: "integers", float: "finite numbers"}


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(MugsConfig)


def _relation_problem(c: "MugsConfig") -> tuple[str, str] | None:
    """(field, problem) of the first relation between fields that does not hold, or None."""
    for name, size in (("global_crop_size", c.global_crop_size), ("size_crops", c.size_crops[0])):
        if size % c.patch_size:  # the ViT cuts whole patches
            return name, f"must be a multiple of --patch_size ({c.patch_size})"
    if c.min_lr > c.lr:
        return "min_lr", f"must not exceed --lr ({c.lr})"
    for name in ("warmup_epochs", "group_warmup_teacher_temp_epochs", "freeze_last_layer"):
        if getattr(c, name) > c.epochs:
            return name, f"must not exceed --epochs ({c.epochs})"
    if c.local_group_knn_top_n > c.local_group_queue_size:
        return "local_group_knn_top_n", f"must not exceed --local_group_queue_size ({c.local_group_queue_size})"
    if c.linear_eval and not c.val_path:
        return "linear_eval", "needs --val_path (the probe's validation set)"
    return None


def flag_text(value: Any) -> str:
    """A value as it is typed on the command line."""
    if isinstance(value, tuple):
        return " ".join(map(flag_text, value))
    if isinstance(value, bool):
        return str(value).lower()
    return shlex.quote(value) if isinstance(value, str) else str(value)


def config_problem(c: "MugsConfig") -> str | None:
    """The first thing wrong with a config as one line naming the flag ("--lr -0.1: must be > 0"), or None.

    Each field's type, then its range (`FIELD_CHECKS`), then the relations between fields.
    """
    hints = _type_hints()
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        problem = _type_problem(hints[f.name], value)
        if problem:  # only from Python: the parser converts every value
            return f"--{f.name} {value!r}: {problem}"
        problem = FIELD_CHECKS.get(f.name, _anything)(value)  # a field missing there fails a test, not a run
        if problem:
            return f"--{f.name} {flag_text(value)}: {problem}"
    relation = _relation_problem(c)
    if relation:
        name, problem = relation
        return f"--{name} {flag_text(getattr(c, name))}: {problem}"
    return None


# Differences from the defaults (spec 1.1). The released runs used W GPUs: 8, 16, 16, 24 and 40.
RECIPES: dict[str, dict[str, Any]] = {
    "vit_small_100ep": dict(arch="vit_small", norm_last_layer=False),
    "vit_small_300ep": dict(
        arch="vit_small",
        group_teacher_temp=0.07,
        group_warmup_teacher_temp_epochs=30,
        weight_decay_end=0.1,
        norm_last_layer=False,
        epochs=300,
    ),
    "vit_small_800ep": dict(
        arch="vit_small",
        group_teacher_temp=0.07,
        group_warmup_teacher_temp_epochs=30,
        weight_decay_end=0.1,
        norm_last_layer=False,
        epochs=800,
    ),
    "vit_base_400ep": dict(
        arch="vit_base",
        batch_size_per_gpu=42,
        group_teacher_temp=0.07,
        group_warmup_teacher_temp_epochs=50,
        min_lr=2e-6,
        weight_decay_end=0.1,
        freeze_last_layer=3,
        norm_last_layer=False,
        epochs=400,
    ),
    "vit_large_250ep": dict(
        arch="vit_large",
        batch_size_per_gpu=16,
        lr=0.0015,
        min_lr=1.5e-4,
        group_teacher_temp=0.07,
        group_warmup_teacher_temp_epochs=50,
        weight_decay=0.025,
        weight_decay_end=0.08,
        norm_last_layer=True,
        drop_path_rate=0.3,
        freeze_last_layer=3,
        epochs=250,
    ),
    # A CPU-sized run for tests and the demo: a 4-block ViT-Tiny on 64/32-px crops, 4 local crops, small heads,
    # queues and memories; peak lr 1e-3 at a global batch of 32; set epochs to the run's length.
    "tiny": dict(
        arch="vit_tiny",
        depth=4,
        global_crop_size=64,
        size_crops=(32,),
        local_crops_number=4,
        batch_size_per_gpu=32,
        epochs=10,
        warmup_epochs=1,
        lr=0.008,
        min_lr=1e-5,
        momentum_teacher=0.99,
        freeze_last_layer=0,
        drop_path_rate=0.0,
        head_hidden_dim=256,
        pred_hidden_dim=512,
        instance_out_dim=128,
        local_group_out_dim=128,
        instance_queue_size=1024,
        local_group_queue_size=1024,
        group_out_dim=512,
        group_bottleneck_dim=64,
        norm_last_layer=False,
        num_workers=2,
        log_freq=10,
    ),
}


def recipe(name: str, **overrides: Any) -> MugsConfig:
    """The config of a named recipe, with `overrides` on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return MugsConfig().replace(recipe=name, **RECIPES[name]).replace(**overrides)


def bool_flag(s: str) -> bool:
    """argparse type for the release's boolean flags: true/false, 1/0, yes/no, on/off."""
    v = s.lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {s!r} (use true or false)")


# The release's flags that mean nothing here: its command lines keep working, the parser accepts these (with
# the release's types) and drops them with one note; they are not fields of MugsConfig.
RELEASE_ONLY_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "dist_url": (str, "the process group is set up from torchrun's environment"),
    "local_rank": (int, "set from the environment (LOCAL_RANK)"),
    "rank": (int, "set from the environment (RANK)"),
    "world_size": (int, "set from the environment (WORLD_SIZE)"),
    "use_prefetcher": (bool_flag, "normalisation always runs on the device"),
    "debug": (bool_flag, "the release's own debugging switch"),
    "ddpjob": (bool_flag, "the release's cluster-launcher switch"),
    "strong_ratio": (float, "read only by RandAugment policies other than the release's inc1, the one implemented"),
    "use_fp16": (bool_flag, "mixed precision is --precision (bf16 by default): true is refused"),
}


def _argparse_kwargs(f: dataclasses.Field, default: Any) -> dict[str, Any]:
    hint = typing.get_type_hints(MugsConfig)[f.name]
    kwargs: dict[str, Any] = {"default": default, "help": f"{f.metadata['help']} (default: {default})"}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    if typing.get_origin(hint) is tuple:
        kwargs.update(type=typing.get_args(hint)[0], nargs="+")
    elif hint is bool:
        kwargs.update(type=bool_flag, metavar="{true,false}")
    else:
        kwargs["type"] = hint
    return kwargs


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem (not the usage block of ~100 flags), exit status 2 as
    argparse. Every command of the project parses with it (mugs-train, -prep, -demo, -knn, -linear, -export)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


# flag spellings other launchers use: torch.distributed.launch passes --local-rank since torch 2.0
_ALIASES = {"local_rank": ("--local-rank",)}


def build_parser(base: MugsConfig | None = None) -> argparse.ArgumentParser:
    """Command-line parser with one `--field` per config field (defaults from `base`), `--recipe`, and the
    `RELEASE_ONLY_FLAGS` (no default: present in the parsed namespace only when given)."""
    base = base or MugsConfig()
    parser = OneLineParser("mugs", allow_abbrev=False, description="Mugs self-supervised pretraining")
    parser.add_argument(
        "--recipe",
        default=base.recipe or None,
        choices=sorted(RECIPES),
        help="start from a named recipe; explicit flags override it",
    )
    for f in dataclasses.fields(MugsConfig):
        if f.name != "recipe":
            flags = (f"--{f.name}", *_ALIASES.get(f.name, ()))
            parser.add_argument(*flags, **_argparse_kwargs(f, getattr(base, f.name)))
    for name, (kind, why) in RELEASE_ONLY_FLAGS.items():
        flags = (f"--{name}", *_ALIASES.get(name, ()))
        parser.add_argument(*flags, type=kind, default=argparse.SUPPRESS, help=f"the release's; no effect: {why}")
    return parser


def parse_config(argv: list[str] | None = None) -> MugsConfig:
    """Parse a command line into a config: `--recipe NAME` sets the base, explicit flags override it.

    An unknown flag, a value of the wrong type or out of range, an inconsistent config, or an --output_dir that
    cannot be written exits with a one-line usage error (status 2) naming the flag, before anything is written.
    """
    pre = OneLineParser("mugs", add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", choices=sorted(RECIPES))
    known, _ = pre.parse_known_args(argv)
    base = recipe(known.recipe) if known.recipe else MugsConfig()
    parser = build_parser(base)
    args = vars(parser.parse_args(argv))
    args["recipe"] = args["recipe"] or ""
    dropped = {name: args.pop(name) for name in RELEASE_ONLY_FLAGS if name in args}
    if dropped.get("use_fp16"):
        parser.error("--use_fp16 true: is not supported: use --precision bf16 (default) or fp32")
    if dropped and int(os.environ.get("RANK", 0)) == 0:
        names = ", ".join(f"--{name}" for name in dropped)
        print(f"mugs: note: {names}: the release's flags without effect here, ignored (see --help)", file=sys.stderr)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        cfg = MugsConfig(**values)
    except ValueError as e:
        parser.error(str(e))
    problem = output_dir_problem(cfg.output_dir)
    if problem:
        parser.error(f"--output_dir {flag_text(cfg.output_dir)}: {problem}")
    return cfg


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a run directory (not a directory, or not writable), or None. Creates nothing: a
    directory still to be made is judged by its nearest existing parent. (Not a check of the config itself: a
    config read from a checkpoint names a directory of another machine.)"""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    where = "" if existing == path else f"its parent {existing} "
    if not existing.is_dir():
        return f"{where}is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{where}is not writable"
    return None
