"""Options of a Mugs run: one dataclass named after the release's flags, named recipes, a generated parser.

The fields up to `ddpjob` are the release's `main.py` arguments with the release's defaults (spec section 1);
the fields after them are this project's additions. `recipe(name)` gives the five released runs and `tiny`.
"""

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
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
    use_fp16: bool = _opt(False, "the release's fp16 switch; only false is supported, see --precision")
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
    strong_ratio: float = _opt(0.45, "RandAugment translate_const ratio (no effect with the inc1 policy)")
    re_prob: float = _opt(0.25, "RandomErasing probability of the strong augmentation")
    vanilla_weak_augmentation: bool = _opt(False, "student global crops are copies of the teacher's (DINO-like)")
    prob: float = _opt(0.5, "a student crop is strong with probability 1 - prob")
    data_path: str = _opt("", "training data (.beton)")
    output_dir: str = _opt("./exp/", "run directory: logs, checkpoints, resolved config")
    saveckp_freq: int = _opt(50, "keep a numbered checkpoint every this many epochs")
    seed: int = _opt(0, "random seed (the same on every rank)")
    num_workers: int = _opt(12, "data-loading worker threads per process")
    dist_url: str = _opt("env://", "accepted for the release's command lines; torchrun's environment is used")
    local_rank: int = _opt(0, "accepted for the release's command lines; set from the environment")
    rank: int = _opt(0, "accepted for the release's command lines; set from the environment")
    world_size: int = _opt(1, "accepted for the release's command lines; set from the environment")
    use_prefetcher: bool = _opt(True, "accepted for the release's command lines; normalisation is always on GPU")
    debug: bool = _opt(False, "accepted for the release's command lines; no effect")
    ddpjob: bool = _opt(False, "accepted for the release's command lines; no effect")
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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        if len(self.loss_weights) != 3 or min(self.loss_weights) < 0 or sum(self.loss_weights) <= 0:
            raise ValueError(f"loss_weights must be 3 non-negative numbers, not all 0: {self.loss_weights}")
        if self.use_fp16:
            raise ValueError("use_fp16 is not supported: use --precision bf16 (default) or fp32")
        if len(self.size_crops) != 1:
            raise ValueError(f"size_crops takes one local crop size, got {self.size_crops}")
        for name in ("global_crop_size", "size_crops"):
            sizes = self.size_crops if name == "size_crops" else (self.global_crop_size,)
            if any(s <= 0 or s % self.patch_size for s in sizes):
                raise ValueError(f"{name} must be positive multiples of patch_size {self.patch_size}: {sizes}")
        if self.local_group_knn_top_n > self.local_group_queue_size:
            raise ValueError("local_group_knn_top_n must not exceed local_group_queue_size")
        for name in ("warmup_epochs", "group_warmup_teacher_temp_epochs"):
            if getattr(self, name) > self.epochs:
                raise ValueError(f"{name} ({getattr(self, name)}) must not exceed epochs ({self.epochs})")

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
        """Inverse of `to_dict`; fields missing from `d` take their defaults, unknown keys are an error."""
        return cls().replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MugsConfig":
        return cls.from_dict(json.loads(text))


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


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line (not the usage of ~100 flags), exit status 2 as argparse."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


# flag spellings other launchers use: torch.distributed.launch passes --local-rank since torch 2.0
_ALIASES = {"local_rank": ("--local-rank",)}


def build_parser(base: MugsConfig | None = None) -> argparse.ArgumentParser:
    """Command-line parser with one `--field` per config field (defaults from `base`) plus `--recipe`."""
    base = base or MugsConfig()
    parser = _OneLineErrors("mugs", allow_abbrev=False, description="Mugs self-supervised pretraining")
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
    return parser


def parse_config(argv: list[str] | None = None) -> MugsConfig:
    """Parse a command line into a config: `--recipe NAME` sets the base, explicit flags override it.

    An unknown flag, a value of the wrong type or an inconsistent config exits with a one-line usage error.
    """
    pre = _OneLineErrors("mugs", add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", choices=sorted(RECIPES))
    known, _ = pre.parse_known_args(argv)
    base = recipe(known.recipe) if known.recipe else MugsConfig()
    parser = build_parser(base)
    args = vars(parser.parse_args(argv))
    args["recipe"] = args["recipe"] or ""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        return MugsConfig(**values)
    except ValueError as e:
        parser.error(str(e))
