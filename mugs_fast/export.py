"""Export a checkpoint's backbone for the tools people already use (spec 9.3-9.5).

    python -m mugs_fast.export CKPT --out DIR        (also `mugs-export`)

writes to DIR:
  <arch>_backbone.safetensors   the plain ViT (relation block dropped), loadable strictly by timm:
                                timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                                                  pretrained_cfg_overlay=dict(file=".../vit_small_backbone.safetensors"))
                                (runs with another depth, crop or patch size add them as keyword arguments; the
                                exact call is printed and saved in export.json)
  <arch>_backbone.pth           the release's format: {"state_dict": ...} with un-prefixed keys, the relation
                                block included, as the released backbone files (DINO-style loaders ignore it)
  export.json                   the timm call, the source checkpoint and its step

The export checks itself: the timm model built by that call gives the teacher's features on a test input.
The files are written under temporary names and renamed once that check passes: a failed or interrupted export
leaves no file that looks like a good one.
"""

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mugs_fast.checkpoint import (
    CheckpointError,
    backbone_from_checkpoint,
    backbone_state,
    checkpoint_config,
    load_checkpoint,
)
from mugs_fast.config import MugsConfig, OneLineParser
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD
from mugs_fast.files import atomic_paths
from mugs_fast.vit import ARCHS


class ExportError(RuntimeError):
    """The exported backbone does not reproduce the checkpoint's features."""


def timm_call(cfg: MugsConfig, file: Path) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments of timm.create_model) that build and load this run's backbone."""
    name = f"{cfg.arch}_patch16_224"
    kwargs: dict[str, Any] = {"pretrained": True, "num_classes": 0}
    if cfg.patch_size != 16:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.global_crop_size != 224:
        kwargs["img_size"] = cfg.global_crop_size
    if cfg.depth and cfg.depth != ARCHS[cfg.arch][1]:
        kwargs["depth"] = cfg.depth
    size = cfg.global_crop_size
    kwargs["pretrained_cfg_overlay"] = dict(
        file=str(file),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=(3, size, size),
        crop_pct=224 / 256,  # Resize(256) -> CenterCrop(224), as the kNN evaluation
        interpolation="bicubic",
    )
    return name, kwargs


def format_call(name: str, kwargs: dict[str, Any]) -> str:
    args = ", ".join([repr(name)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"timm.create_model({args})"


def export(ckpt_path: Path, out: Path, *, checkpoint_key: str = "teacher", verify: bool = True) -> dict[str, Any]:
    """Writes the files listed in the module docstring; returns the contents of export.json."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt)
    if checkpoint_key not in ("teacher", "student"):
        raise CheckpointError(f"checkpoint_key must be teacher or student, not {checkpoint_key!r}")
    full = backbone_state(ckpt[checkpoint_key], relation_blocks=True)
    plain = {k: v.contiguous() for k, v in full.items() if not k.startswith("relation_blocks.")}
    out.mkdir(parents=True, exist_ok=True)
    safetensors_path, pth_path = out / f"{cfg.arch}_backbone.safetensors", out / f"{cfg.arch}_backbone.pth"
    name, kwargs = timm_call(cfg, safetensors_path.resolve())
    info = {
        "timm_model": name,
        "timm_kwargs": kwargs,
        "timm_call": format_call(name, kwargs),
        "source": str(ckpt_path),
        "checkpoint_key": checkpoint_key,
        "step": ckpt.get("step"),
        "arch": cfg.arch,
    }
    metadata = {"format": "pt", **{k: json.dumps(v) for k, v in info.items()}}
    # temporary names keep the suffix: timm picks its loader by the file's suffix; both are renamed only once timm
    # reproduces the features
    with atomic_paths([safetensors_path, pth_path], keep_suffix=True) as (safetensors_tmp, pth_tmp):
        save_file(plain, safetensors_tmp, metadata=metadata)
        torch.save({"state_dict": full}, pth_tmp)
        if verify:
            overlay = {**kwargs["pretrained_cfg_overlay"], "file": str(safetensors_tmp)}
            _verify(ckpt, name, {**kwargs, "pretrained_cfg_overlay": overlay}, checkpoint_key)
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@torch.no_grad()
def _verify(ckpt: dict[str, Any], name: str, kwargs: dict[str, Any], checkpoint_key: str) -> None:
    """Builds the timm model as printed and compares its features with ours on a fixed random input."""
    import timm

    ours = backbone_from_checkpoint(ckpt, key=checkpoint_key)
    theirs = timm.create_model(name, **kwargs).eval()
    size = kwargs["pretrained_cfg_overlay"]["input_size"][-1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs_features, our_features = theirs(x), ours.forward_cls(x)
    try:
        torch.testing.assert_close(theirs_features, our_features, rtol=1e-4, atol=1e-4)
    except AssertionError:
        diff = (theirs_features - our_features).abs().max().item()
        message = f"timm's {name} gives other features than the checkpoint (max difference {diff:.3g})"
        raise ExportError(message) from None


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="mugs-export", description="Export a checkpoint's backbone for timm and DINO tools.")
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (checkpoint.pth of a run directory)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--checkpoint_key", choices=("teacher", "student"), default="teacher", help="default: teacher")
    args = p.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, checkpoint_key=args.checkpoint_key)
    except (CheckpointError, ExportError, OSError) as e:
        print(f"mugs-export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported the {info['checkpoint_key']} backbone of {args.checkpoint} (step {info['step']}) to {args.out}")
    print(f"load it with timm:\n  import timm\n  model = {info['timm_call']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
