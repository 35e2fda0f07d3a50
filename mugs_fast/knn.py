"""Weighted k-NN evaluation of a backbone (DINO's and the release's `eval_knn.py`, spec 10.2).

    python -m mugs_fast.knn CKPT --train TRAIN.beton --val VAL.beton [--k 10 20 100 200]   (also `mugs-knn`)

Features: the teacher's CLS token after the final LayerNorm (relation block skipped), L2-normalised, of
Resize(256, bicubic) -> CenterCrop(224) images (scaled with the run's crop size). Each validation image takes
its k most cosine-similar training images; each votes for its label with weight exp(similarity / T); the
classes with the largest sums are the top-1 / top-5 predictions. T = 0.05 for ViT-Ti/S, 0.04 for ViT-B/L.
Labels are matched by index, so the two sets must list the same classes in the same order (their
`.classes.json` side files): anything else is refused before any feature is computed.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mugs_fast.config import OneLineParser
from mugs_fast.data.beton import BetonError, BetonReader, sidecar_path
from mugs_fast.distributed import all_gather_cat
from mugs_fast.runtime import autocast, compute_dtype

DEFAULT_KS = (10, 20, 100, 200)


class DatasetMismatch(ValueError):
    """A val set whose labels do not mean what the train set's labels mean (one-line message)."""


def check_knn_datasets(train: BetonReader, val: BetonReader) -> None:
    """Refuses a val set whose labels cannot be matched to the train set's by index: class lists (the
    `.classes.json` side files) that differ, or, without both lists, val labels beyond the train set's classes.
    Also an empty val set. Raises DatasetMismatch."""
    if len(val) == 0:
        raise DatasetMismatch("holds no samples")
    if train.classes is not None and val.classes is not None:
        if val.classes != train.classes:
            raise DatasetMismatch(
                f"its class list ({sidecar_path(val.path, 'classes').name}) differs from the training set's "
                f"({sidecar_path(train.path, 'classes').name}): {_first_difference(train.classes, val.classes)}; "
                "kNN matches labels by index: convert both splits from trees with the same class folders"
            )
    elif int(val.labels.max()) >= train.num_classes:
        raise DatasetMismatch(
            f"labels up to {int(val.labels.max())}, but the training set {train.path.name} has {train.num_classes} "
            "classes: kNN matches labels by index"
        )


def _first_difference(train: list[str], val: list[str]) -> str:
    for label, (t, v) in enumerate(zip(train, val, strict=False)):  # lists of other lengths too
        if t != v:
            return f"label {label} is {v!r} in val, {t!r} in train"
    return f"{len(val)} classes in val, {len(train)} in train"


def knn_temperature(arch: str) -> float:
    """The release's kNN temperature: 0.05 for ViT-S (and our ViT-Ti), 0.04 for ViT-B and ViT-L."""
    return 0.04 if arch in ("vit_base", "vit_large") else 0.05


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.05,
    num_classes: int | None = None,
    chunk: int = 256,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN vote, for each k.

    train_features (N, D), test_features (M, D): L2-normalised rows; labels (N,), (M,) int64 in [0, C).
    A k larger than N uses all N training samples. Top-5 is 100 when there are 5 classes or fewer.
    """
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), len(train_labels))
    top = min(5, num_classes)
    correct = {k: torch.zeros(2, dtype=torch.long, device=test_features.device) for k in ks}
    for start in range(0, len(test_labels), chunk):
        x, y = test_features[start : start + chunk], test_labels[start : start + chunk]
        sims, idx = (x @ train_features.T).topk(k_max, dim=1)  # (b, k_max), most similar first
        weights, neighbour_labels = (sims / temperature).exp(), train_labels[idx]  # (b, k_max) each
        for k in ks:
            votes = torch.zeros(len(y), num_classes, device=x.device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # (b, C)
            hits = votes.topk(top, dim=1).indices == y.unsqueeze(1)  # (b, top)
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    total = max(len(test_labels), 1)
    return {k: {"top1": 100.0 * c[0].item() / total, "top5": 100.0 * c[1].item() / total} for k, c in correct.items()}


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader, *, precision: str = "bf16", progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features (N, D) fp32 and labels (N,) of every rank's share, in file order.

    loader: an `EvalLoader`; rows it marks with label -1 (padding, undecodable) are dropped.
    """
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    dtype = compute_dtype(precision, device)
    features, labels = [], []
    for images, y in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
        with autocast(dtype, device):
            f = backbone.forward_cls(images)  # (b, D)
        features.append(F.normalize(f.float(), dim=1))
        labels.append(y)
    backbone.train(was_training)
    features, labels = all_gather_cat(torch.cat(features)), all_gather_cat(torch.cat(labels))  # rank order
    keep = labels >= 0
    return features[keep], labels[keep]


def evaluate_knn(
    backbone: nn.Module,
    train_path: str | Path,
    val_path: str | Path,
    *,
    crop_size: int,
    temperature: float,
    ks: tuple[int, ...] = DEFAULT_KS,
    batch_size: int = 128,
    precision: str = "bf16",
    rank: int = 0,
    world_size: int = 1,
    num_threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """kNN accuracies of `backbone` (on its device) with `train_path` as the memory bank, on `val_path`.

    Every rank must call it (features are gathered). Returns a JSON-able dict: per k top1 / top5 (%), the
    temperature, the numbers of samples and classes. Raises DatasetMismatch (`check_knn_datasets`) and
    BetonError before any feature is computed.
    """
    from mugs_fast.data.eval_loader import EvalLoader  # imports DALI

    check_knn_datasets(BetonReader(train_path), BetonReader(val_path))
    device = next(backbone.parameters()).device
    loader_args = dict(crop_size=crop_size, device=device, rank=rank, world_size=world_size, num_threads=num_threads)
    train_loader = EvalLoader(train_path, batch_size, **loader_args)
    val_loader = EvalLoader(val_path, batch_size, **loader_args)
    train_f, train_y = extract_features(backbone, train_loader, precision=precision, progress=progress)
    val_f, val_y = extract_features(backbone, val_loader, precision=precision, progress=progress)
    num_classes = max(train_loader.num_classes, val_loader.num_classes)
    accuracy = knn_classify(train_f, train_y, val_f, val_y, ks, temperature, num_classes)
    return {
        "k": {str(k): v for k, v in accuracy.items()},
        "temperature": temperature,
        "train_samples": len(train_y),
        "val_samples": len(val_y),
        "num_classes": num_classes,
    }


def format_results(results: dict[str, Any]) -> str:
    rows = [f"  k={k:<4} top-1 {v['top1']:6.2f}%  top-5 {v['top5']:6.2f}%" for k, v in results["k"].items()]
    head = (
        f"kNN (T={results['temperature']}) on {results['val_samples']:,} val images, {results['train_samples']:,} "
        f"train images, {results['num_classes']} classes:"
    )
    return "\n".join([head, *rows])


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mugs-knn", description="Weighted k-NN accuracy of a checkpoint's teacher.")
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (checkpoint.pth of a run directory)")
    p.add_argument("--train", type=Path, required=True, help=".beton of the training images (the kNN memory)")
    p.add_argument("--val", type=Path, required=True, help=".beton of the images to classify")
    p.add_argument(
        "--k", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (default 10 20 100 200)"
    )
    p.add_argument("--temperature", type=float, default=None, help="vote temperature (default 0.05 ViT-Ti/S, 0.04 B/L)")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on GPU (default)")
    p.add_argument("--num_workers", type=int, default=8, help="DALI threads (default 8; on CPU at most cores - 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: knn_<CKPT name>.json beside CKPT)")
    return p


def main(argv: list[str] | None = None) -> int:
    from mugs_fast.checkpoint import CheckpointError, backbone_from_checkpoint, checkpoint_config, load_checkpoint
    from mugs_fast.runtime import cpu_thread_budget

    args = build_parser().parse_args(argv)
    bad_temperature = args.temperature is not None and args.temperature <= 0
    if min(args.k) < 1 or args.batch_size < 1 or args.num_workers < 1 or bad_temperature:
        print("mugs-knn: error: --k, --batch_size, --num_workers and --temperature must be positive", file=sys.stderr)
        return 1
    try:
        ckpt = load_checkpoint(args.checkpoint)
        cfg = checkpoint_config(ckpt)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = backbone_from_checkpoint(ckpt).to(device)
        temperature = knn_temperature(cfg.arch) if args.temperature is None else args.temperature
        with cpu_thread_budget(args.num_workers) as loader_threads:
            results = evaluate_knn(
                backbone,
                args.train,
                args.val,
                crop_size=cfg.global_crop_size,
                temperature=temperature,
                ks=tuple(args.k),
                batch_size=args.batch_size,
                precision=args.precision,
                num_threads=loader_threads,
                progress=True,
            )
    except DatasetMismatch as e:
        print(f"mugs-knn: error: --val {args.val}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, BetonError, FileNotFoundError) as e:
        print(f"mugs-knn: error: {e}", file=sys.stderr)
        return 1
    results.update(checkpoint=str(args.checkpoint), step=ckpt.get("step"), arch=cfg.arch)
    out = args.out or args.checkpoint.with_name(f"knn_{args.checkpoint.stem}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_results(results))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
