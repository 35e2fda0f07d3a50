"""Frozen features for the linear probe: the backbone of any file the project meets, the release's feature
types, extraction through the DALI eval loader (centre crop and its horizontal flip), and an on-disk cache.

Backbone files: a checkpoint of this project or one in the release's layout (`ckpt[checkpoint_key]`, keys
`backbone.*` or `module.backbone.*`), or a backbone alone (`mugs-export`'s `.safetensors` or `{"state_dict"}`
`.pth`, the released `*_backbone_*.pth`). The architecture (width, depth, patch and crop size) is read from the
weights' shapes, so the three kinds load alike; the relation block is dropped.

Features (the release's `eval_linear.py`, spec 10.2): the CLS tokens of the last `n_last_blocks` blocks, each
through the final LayerNorm, concatenated; with `avgpool_patchtokens`, also the mean of the last block's
normalised patch tokens. Recipes: 4 blocks without pooling for ViT-Ti/S, 1 block with pooling for ViT-B/L.
"""

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from mugs_fast.checkpoint import CheckpointError, atomic_save, backbone_state
from mugs_fast.distributed import all_gather_cat
from mugs_fast.vit import ARCHS, MugsViT, build_backbone

INVALID = -1  # the eval loader's label of padding rows and undecodable samples


def default_feature_type(arch: str) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patchtokens) of the release's recipe for `arch`."""
    return (1, True) if arch in ("vit_base", "vit_large") else (4, False)


class BackboneFile(NamedTuple):
    """A backbone read from a file, its architecture, and the recipe of its run where the file says ("" if not)."""

    backbone: MugsViT
    arch: str
    recipe: str


def read_backbone_state(path: Path, checkpoint_key: str = "teacher") -> tuple[dict[str, torch.Tensor], str]:
    """(the backbone's weights (un-prefixed timm names), the run's recipe or "") from any of the files in the
    module docstring; the recipe is a checkpoint's config's, or the release's `args` arch and epochs."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path), ""
        with torch.serialization.safe_globals([argparse.Namespace]):  # the release's `args` entry
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip, safetensors and torch errors all mean "unreadable"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line})") from None
    recipe = ""
    if isinstance(obj, dict) and isinstance(obj.get(checkpoint_key), dict):  # a training checkpoint's network
        state = backbone_state(obj[checkpoint_key], relation_blocks=False)
        recipe = _recipe_of(obj)
    else:  # a backbone file: {"state_dict": ...} or the weights themselves
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        obj = obj if isinstance(obj, dict) else {}
        state = {str(k).removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()}
    if "cls_token" not in state:
        raise CheckpointError(f"{path} holds no '{checkpoint_key}' network and no ViT backbone")
    weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("relation_blocks.")}
    return weights, recipe


def _recipe_of(ckpt: dict) -> str:
    """A project checkpoint's recipe, or the release's name of the run an `args` entry describes."""
    if isinstance(ckpt.get("config"), dict):
        return str(ckpt["config"].get("recipe", ""))
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace) and hasattr(args, "arch") and hasattr(args, "epochs"):
        return f"{args.arch}_{args.epochs}ep"
    return ""


def backbone_from_state(state: dict[str, torch.Tensor], arch: str | None = None) -> tuple[MugsViT, str]:
    """(the backbone in eval mode on the CPU, its architecture), built from the weights' shapes; CheckpointError
    when `arch` is given and differs, or when the weights fit no known architecture."""
    width = state["cls_token"].shape[-1]
    found = next((name for name, (w, _, _) in ARCHS.items() if w == width), None)
    if found is None:
        raise CheckpointError(f"a backbone of width {width} is none of {', '.join(ARCHS)}")
    if arch is not None and arch != found:
        raise CheckpointError(f"the checkpoint holds a {found} backbone (width {width}), not {arch}")
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    backbone = build_backbone(found, patch_size=patch, img_size=grid * patch, depth=depth, num_relation_blocks=0)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
        raise CheckpointError(f"the weights do not fit a {found} backbone: {detail}") from None
    return backbone.eval(), found


def load_backbone(path: Path, checkpoint_key: str = "teacher", arch: str | None = None) -> BackboneFile:
    """The backbone of a checkpoint or backbone file; CheckpointError (one line) otherwise."""
    state, recipe = read_backbone_state(path, checkpoint_key)
    return BackboneFile(*backbone_from_state(state, arch), recipe)


def probe_features(backbone: MugsViT, images: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """Images (N, 3, S, S) -> features (N, (n_last_blocks + avgpool) * D): the release's linear-probe input."""
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))  # (N, 1+P, D)
    first = len(backbone.blocks) - n_last_blocks
    outputs = []
    for i, block in enumerate(backbone.blocks):
        x = block(x)
        if i >= first:
            outputs.append(backbone.norm(x[:, 0]))  # CLS after the final LN, (N, D)
    if avgpool:
        outputs.append(backbone.norm(x[:, 1:]).mean(dim=1))  # mean normalised patch token, (N, D)
    return torch.cat(outputs, dim=1)


@dataclass(frozen=True)
class FeatureSpec:
    """What the features of a split are: the options that change them (and the cache key)."""

    n_last_blocks: int
    avgpool_patchtokens: bool
    crop_size: int
    flip: bool  # also the horizontally flipped crop (training views)
    dtype: str  # "bfloat16" (GPU) or "float32"


def extract(
    backbone: MugsViT,
    path: Path,
    spec: FeatureSpec,
    *,
    batch_size: int = 128,
    num_threads: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(views (V, N, D) in spec.dtype, labels (N,)) of every image of a .beton, on the backbone's device, in file
    order: V = 2 (the crop, its flip) with spec.flip, else 1. Undecodable samples are left out. Every rank must
    call it (features are gathered)."""
    from mugs_fast.data.eval_loader import EvalLoader  # imports DALI

    device = next(backbone.parameters()).device
    loader_args = dict(crop_size=spec.crop_size, device=device, rank=rank, world_size=world_size)
    loader = EvalLoader(path, batch_size, **loader_args, num_threads=num_threads)
    return extract_from(backbone, loader, spec, progress=progress)


@torch.no_grad()
def extract_from(backbone: MugsViT, loader, spec: FeatureSpec, *, progress: bool = False) -> tuple[torch.Tensor, ...]:
    """`extract` with an `EvalLoader` of spec.crop_size built by the caller (the benchmark times the loop alone)."""
    device, dtype = next(backbone.parameters()).device, getattr(torch, spec.dtype)
    num_views, dim = 1 + spec.flip, (spec.n_last_blocks + spec.avgpool_patchtokens) * backbone.embed_dim
    views = torch.empty(num_views, len(loader.indices), dim, dtype=dtype, device=device)  # filled batch by batch
    labels = torch.empty(len(loader.indices), dtype=torch.long, device=device)
    start, name = 0, Path(loader.reader.path).name
    for images, y in tqdm(loader, desc=f"features {name}", unit="batch", disable=not progress, leave=False):
        crops = torch.cat([images, images.flip(-1)]) if spec.flip else images  # (V b, 3, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            f = probe_features(backbone, crops, spec.n_last_blocks, spec.avgpool_patchtokens)  # (V b, D')
        views[:, start : start + len(y)] = f.view(num_views, len(y), dim)
        labels[start : start + len(y)] = y
        start += len(y)
    views, labels = all_gather_cat(views, dim=1), all_gather_cat(labels)  # rank order = file order
    keep = labels != INVALID
    return (views, labels) if bool(keep.all()) else (views[:, keep], labels[keep])


def state_digest(backbone: torch.nn.Module) -> str:
    """sha256 of the backbone's weights (names, dtypes, shapes, bytes): the cache key of a checkpoint's content."""
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: Path, beton: Path, digest: str, spec: FeatureSpec) -> Path:
    """The cache file of a .beton's features: keyed on the weights, the options and the file (path, size, mtime)."""
    stat = beton.stat()
    key = json.dumps([digest, asdict(spec), str(beton.resolve()), stat.st_size, stat.st_mtime_ns], sort_keys=True)
    return cache_dir / f"{beton.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def cached_extract(
    backbone: MugsViT, path: Path, spec: FeatureSpec, cache_dir: Path | None, digest: str, **extract_args: Any
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`extract`, read from / written to `cache_dir` when given; the third value says whether it was read."""
    file = cache_path(cache_dir, path, digest, spec) if cache_dir is not None else None
    device = next(backbone.parameters()).device
    if file is not None and file.is_file():
        saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return saved["views"].to(device), saved["labels"].to(device), True
    views, labels = extract(backbone, path, spec, **extract_args)
    if file is not None and extract_args.get("rank", 0) == 0:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save({"views": views.cpu(), "labels": labels.cpu(), "spec": asdict(spec), "digest": digest}, file)
    return views, labels, False
