"""Linear probing of a frozen backbone: the paper's headline number (spec 10.2), in minutes.

    python -m mugs_fast.linear CKPT --train TRAIN.beton --val VAL.beton      (also `mugs-linear`)

CKPT: a checkpoint of this project or in the release's layout (`--checkpoint_key teacher|student`), or a backbone
written by `mugs-export` (see `linear_features`).

`--mode cached` (default; monitoring, model selection): every image's frozen features (Resize -> CenterCrop, as the
kNN evaluation, and its horizontal flip; bf16 on the GPU) are computed once and kept in memory (`--feature_cache
DIR` also keeps them on disk, keyed on the weights and the options), then a grid of classifiers (`--lrs` x `--wds`)
trains at once on them (`linear_sweep`). The best is picked by its top-1 on a held-out part of train
(`--holdout_fraction` of each class, from `--seed`; never on val), and reported with its val top-1 / top-5, next to
the whole grid, in a printed table and `linear_<CKPT name>.json` beside CKPT.

`--mode augmented` (the number to compare with the paper): the release's protocol, one classifier on strong
augmented crops every epoch, DDP under torchrun, resumable (`linear_augmented`).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mugs_fast.data.beton import open_beton
from mugs_fast.distributed import get_rank, settle
from mugs_fast.linear_features import (
    BackboneFile,
    FeatureSpec,
    cached_extract,
    default_feature_type,
    load_backbone,
    state_digest,
)
from mugs_fast.linear_sweep import DEFAULT_LRS, DEFAULT_WDS, grid_accuracy, holdout_split, train_grid
from mugs_fast.runtime import compute_dtype
from mugs_fast.vit import ARCHS


class LinearProbeError(ValueError):
    """Data or options the probe cannot run on (one-line message)."""


@dataclass(frozen=True)
class SweepSettings:
    """The grid and how it trains (learning rates per 256 images)."""

    lrs: tuple[float, ...] = DEFAULT_LRS
    wds: tuple[float, ...] = DEFAULT_WDS
    epochs: int = 100
    batch_size: int = 1024
    holdout_fraction: float = 0.1
    seed: int = 0
    standardize: bool = True  # features standardised per dimension (`linear_sweep`); False: raw, as the release


def check_classes(train_path: Path, val_path: Path) -> int:
    """The number of classes; LinearProbeError when val's labels cannot be matched to train's by index (the
    `.classes.json` side files differ, or val labels lie beyond train's classes; `knn.check_knn_datasets`)."""
    from mugs_fast.knn import DatasetMismatch, check_knn_datasets

    train, val = open_beton(train_path), open_beton(val_path)
    try:
        check_knn_datasets(train, val)
    except DatasetMismatch as e:
        raise LinearProbeError(f"--val {val_path}: {e}") from None
    return train.num_classes


def feature_spec(
    backbone: nn.Module, arch: str, n_last_blocks: int | None, avgpool: bool | None, precision: str, flip: bool
) -> FeatureSpec:
    """The features to extract: the recipe's defaults for `arch` where not given (at most all blocks)."""
    default_n, default_avgpool = default_feature_type(arch)
    n = min(default_n, len(backbone.blocks)) if n_last_blocks is None else n_last_blocks
    if not 1 <= n <= len(backbone.blocks):
        raise LinearProbeError(f"--n_last_blocks {n}: the backbone has {len(backbone.blocks)} blocks")
    return FeatureSpec(
        n_last_blocks=n,
        avgpool_patchtokens=default_avgpool if avgpool is None else avgpool,
        crop_size=backbone.patch_embed.img_size[0],
        flip=flip,
        dtype=str(compute_dtype(precision, next(backbone.parameters()).device)).removeprefix("torch."),
    )


def linear_probe(
    backbone: nn.Module,
    arch: str,
    train_path: str | Path,
    val_path: str | Path,
    *,
    n_last_blocks: int | None = None,
    avgpool_patchtokens: bool | None = None,
    sweep: SweepSettings = SweepSettings(),
    precision: str = "bf16",
    feature_cache: Path | None = None,
    batch_size: int = 128,
    num_threads: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """The fast linear probe of `backbone` (on its device): features, sweep, held-out choice, val accuracy.

    Every rank must call it (features are gathered; each rank then runs the same sweep). Returns the JSON-able
    results: `best` (lr, wd, held-out and val accuracies), `grid` (every classifier), the settings and counts.
    """
    if feature_cache is not None and world_size > 1:  # ranks could disagree on whether the cache holds a split
        raise LinearProbeError("--feature_cache works in a single process")
    train_path, val_path = Path(train_path), Path(val_path)
    num_classes = check_classes(train_path, val_path)
    train_spec = feature_spec(backbone, arch, n_last_blocks, avgpool_patchtokens, precision, flip=True)
    val_spec = FeatureSpec(**{**asdict(train_spec), "flip": False})
    digest = state_digest(backbone) if feature_cache is not None else ""
    args = dict(batch_size=batch_size, num_threads=num_threads, rank=rank, world_size=world_size, progress=progress)
    t0 = time.perf_counter()
    train_views, train_y, train_hit = cached_extract(backbone, train_path, train_spec, feature_cache, digest, **args)
    val_views, val_y, val_hit = cached_extract(backbone, val_path, val_spec, feature_cache, digest, **args)
    t1 = time.perf_counter()

    results = fit_and_score(train_views, train_y, val_views, val_y, num_classes, sweep, progress=progress)
    features = {**asdict(train_spec), "dim": train_views.shape[-1], "cache_hit": train_hit and val_hit}
    results.update(
        features=features, seconds={"features": round(t1 - t0, 2), "sweep": round(time.perf_counter() - t1, 2)}
    )
    return results


def fit_and_score(
    train_views: torch.Tensor,
    train_y: torch.Tensor,
    val_views: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    sweep: SweepSettings,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains the grid on train (views (V, N, D), labels (N,)) less its held-out part, picks the best on that
    part, scores every classifier on val (view 0 of (V, M, D), labels (M,)); the results without the features."""
    fit_rows, held_rows = holdout_split(train_y.cpu().numpy(), sweep.holdout_fraction, sweep.seed)
    if len(held_rows) == 0 or len(fit_rows) == 0:
        raise LinearProbeError(f"{len(train_y)} training images are too few to hold out a part of each class")
    grid = train_grid(
        train_views,
        train_y,
        fit_rows,
        lrs=sweep.lrs,
        wds=sweep.wds,
        num_classes=num_classes,
        epochs=sweep.epochs,
        batch_size=sweep.batch_size,
        seed=sweep.seed,
        standardize=sweep.standardize,
        progress=progress,
    )
    held = torch.as_tensor(held_rows, device=train_y.device)
    held_top1, held_top5 = grid_accuracy(grid, train_views[0, held], train_y[held])
    val_top1, val_top5 = grid_accuracy(grid, val_views[0], val_y)
    rows = [
        {"lr": lr, "wd": wd, "holdout_top1": float(h1), "holdout_top5": float(h5), "top1": float(v1), "top5": float(v5)}
        for (lr, wd), h1, h5, v1, v5 in zip(grid.points, held_top1, held_top5, val_top1, val_top5, strict=True)
    ]
    best = max(range(len(rows)), key=lambda g: (rows[g]["holdout_top1"], rows[g]["holdout_top5"]))  # first of ties
    return {
        "mode": "cached",
        "best": rows[best],
        "grid": rows,
        "sweep": asdict(sweep),
        "train_samples": len(fit_rows),
        "holdout_samples": len(held_rows),
        "val_samples": len(val_y),
        "num_classes": num_classes,
    }


def format_results(results: dict[str, Any]) -> str:
    """The grid as a table, the best (chosen on held-out train) marked with '*'."""
    f, best = results["features"], results["best"]
    kind = f"CLS of the last {f['n_last_blocks']} block(s)"
    kind += " + mean patch token" if f["avgpool_patchtokens"] else ""
    lines = [
        f"linear probe ({kind}, {f['dim']} features, {results['sweep']['epochs']} epochs): "
        f"{results['train_samples']:,} train + {results['holdout_samples']:,} held-out images, "
        f"{results['val_samples']:,} val images, {results['num_classes']} classes",
        f"  {'lr':>8} {'wd':>8}  {'held-out top-1':>14}  {'val top-1':>9}  {'val top-5':>9}",
    ]
    for r in results["grid"]:
        mark = "*" if r is best else " "
        lines.append(
            f"{mark} {r['lr']:>8g} {r['wd']:>8g}  {r['holdout_top1']:13.2f}%  {r['top1']:8.2f}%  {r['top5']:8.2f}%"
        )
    lines.append(
        f"best on held-out train: lr {best['lr']:g}, wd {best['wd']:g} -> val top-1 {best['top1']:.2f}%, "
        f"top-5 {best['top5']:.2f}%"
    )
    return "\n".join(lines)


def format_augmented(results: dict[str, Any]) -> str:
    f = results["features"]
    return (
        f"linear probe, augmented ({f['dim']} features, {results['epochs']} epochs, lr {results['lr']:g} per 256 "
        f"images x {results['batch_size_per_gpu']} x {results['world_size']} process(es) / 256): val top-1 "
        f"{results['top1']:.2f}%, top-5 {results['top5']:.2f}% on {results['val_samples']:,} images"
    )


def build_parser() -> argparse.ArgumentParser:
    from mugs_fast.config import OneLineParser, bool_flag

    p = OneLineParser(prog="mugs-linear", description="Linear-probe accuracy of a checkpoint's backbone.")
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (ours or the release's) or a mugs-export file")
    p.add_argument("--train", type=Path, required=True, help=".beton of the training images")
    p.add_argument("--val", type=Path, required=True, help=".beton of the images to classify")
    p.add_argument(
        "--mode",
        choices=("cached", "augmented"),
        default="cached",
        help="cached: frozen features once, a grid of classifiers (default); augmented: the release's",
    )
    p.add_argument("--checkpoint_key", choices=("teacher", "student"), default="teacher", help="default: teacher")
    p.add_argument("--arch", choices=tuple(ARCHS), default=None, help="expected architecture (default: any)")
    p.add_argument("--n_last_blocks", type=int, default=None, help="CLS tokens of this many last blocks (S: 4, B/L: 1)")
    p.add_argument(
        "--avgpool_patchtokens",
        type=bool_flag,
        default=None,
        metavar="{true,false}",
        help="also the last block's mean patch token (default: false for ViT-Ti/S, true for B/L)",
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="cached: images per sweep step (default 1024); augmented: per GPU (default 256, B/L: 128)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (cached), the init and the batches")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 features on GPU (default)")
    p.add_argument("--eval_batch_size", type=int, default=128, help="cached: images per forward pass (default 128)")
    p.add_argument("--num_workers", type=int, default=8, help="DALI threads (default 8; on CPU at most cores - 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: linear_<CKPT name>.json beside CKPT)")
    cached = p.add_argument_group("cached mode")
    cached.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="lrs per 256 images")
    cached.add_argument("--wds", type=float, nargs="+", default=list(DEFAULT_WDS), help="weight decays")
    cached.add_argument("--holdout_fraction", type=float, default=0.1, help="share of each train class held out")
    cached.add_argument("--feature_cache", type=Path, default=None, help="keep the features in this folder")
    cached.add_argument(
        "--standardize",
        type=bool_flag,
        default=True,
        metavar="{true,false}",
        help="standardise the features per dimension (default true; false: raw, as the release)",
    )
    augmented = p.add_argument_group("augmented mode")
    augmented.add_argument("--lr", type=float, default=None, help="per 256 images (default: the release's recipe's)")
    augmented.add_argument(
        "--output_dir", type=Path, default=None, help="checkpoint folder (default: linear_<CKPT name>/ beside CKPT)"
    )
    augmented.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; usage errors (exit status 2) for values out of range."""
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.epochs, args.batch_size or 1, args.eval_batch_size, args.num_workers) < 1:
        p.error("--epochs, --batch_size, --eval_batch_size and --num_workers must be positive")
    if min(args.lrs) <= 0 or min(args.wds) < 0 or (args.lr is not None and args.lr <= 0) or args.max_steps < 0:
        p.error("--lrs and --lr must be positive, --wds and --max_steps non-negative")
    if not 0 < args.holdout_fraction < 1:
        p.error("--holdout_fraction must lie between 0 and 1")
    if args.n_last_blocks is not None and args.n_last_blocks < 1:
        p.error("--n_last_blocks must be positive")
    return args


def run_cached(backbone: nn.Module, arch: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    batch_size = args.batch_size or SweepSettings.batch_size
    sweep = SweepSettings(
        tuple(args.lrs), tuple(args.wds), args.epochs, batch_size, args.holdout_fraction, args.seed, args.standardize
    )
    return linear_probe(
        backbone,
        arch,
        args.train,
        args.val,
        n_last_blocks=args.n_last_blocks,
        avgpool_patchtokens=args.avgpool_patchtokens,
        sweep=sweep,
        precision=args.precision,
        feature_cache=args.feature_cache,
        batch_size=args.eval_batch_size,
        num_threads=threads,
        progress=True,
    )


def run_augmented(loaded: BackboneFile, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    from mugs_fast.linear_augmented import AugmentedSettings, release_batch, release_lr, train_augmented

    backbone, arch = loaded.backbone, loaded.arch
    num_classes = check_classes(args.train, args.val)
    spec = feature_spec(backbone, arch, args.n_last_blocks, args.avgpool_patchtokens, args.precision, flip=False)
    lr = args.lr or release_lr(arch, loaded.recipe)
    settings = AugmentedSettings(
        lr, args.batch_size or release_batch(arch), args.epochs, args.seed, args.max_steps, threads
    )
    output_dir = args.output_dir or args.checkpoint.with_name(f"linear_{args.checkpoint.stem}")
    results = train_augmented(
        backbone, args.train, args.val, spec, num_classes, settings, output_dir, progress=get_rank() == 0
    )
    dim = (spec.n_last_blocks + spec.avgpool_patchtokens) * backbone.embed_dim
    return {**results, "features": {**asdict(spec), "dim": dim}, "output_dir": str(output_dir)}


def init_distributed() -> torch.device:
    """Joins torchrun's process group (WORLD_SIZE > 1); this process's device."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _main(args: argparse.Namespace) -> int:
    from mugs_fast.runtime import cpu_thread_budget

    try:
        device = init_distributed() if args.mode == "augmented" else None
        loaded = load_backbone(args.checkpoint, args.checkpoint_key, args.arch)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaded = loaded._replace(backbone=loaded.backbone.to(device))
        with cpu_thread_budget(args.num_workers) as threads:
            if args.mode == "cached":
                results = run_cached(loaded.backbone, loaded.arch, args, threads)
            else:
                results = run_augmented(loaded, args, threads)
                settle()  # every rank is past the last collective (the val counts' all-reduce or a DDP step)
    except (ValueError, OSError) as e:  # CheckpointError, BetonError, LinearProbeError, AugmentedProbeError, sampler
        print(f"mugs-linear: error: {e}", file=sys.stderr)
        return 1
    if get_rank() != 0:
        return 0
    if "stopped_at_epoch" in results:
        epoch = results["stopped_at_epoch"]  # 0-based: the epochs before it are saved
        saved = (
            f"{epoch} epoch(s) saved in {results['output_dir']}" if epoch else "no epoch finished yet: nothing saved"
        )
        print(f"stopped at step {results['step']} (epoch {epoch + 1}); {saved}; run the same command to continue")
        return 0
    results.update(checkpoint=str(args.checkpoint), checkpoint_key=args.checkpoint_key, arch=loaded.arch)
    out = args.out or args.checkpoint.with_name(f"linear_{args.checkpoint.stem}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_results(results) if args.mode == "cached" else format_augmented(results))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
