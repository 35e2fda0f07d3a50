"""`mugs-linear --mode augmented`: the release's linear probe (`eval_linear.py`, spec 10.2), the number to compare
with the paper.

One `Linear(D, C)` (weights N(0, 0.01), bias 0) on the frozen backbone's features of strong training crops
(`mugs_fast.data.linear_loader`: DeiT's RandomResizedCrop 0.08-1 + flip + RandAugment + RandomErasing, fresh every
epoch), SGD with momentum 0.9 and no weight decay, lr = base lr x global batch / 256 annealed per epoch by a cosine
to 0, 100 epochs; then top-1 / top-5 on val's centre crops. Base lr and batch per GPU are the release's per recipe
(ViT-S 100 / 300 / 800 epochs: 0.015 / 0.02 / 0.01 at 256 per GPU, ViT-B: 0.002 at 128; the release ran 4 GPUs).
One process per GPU under torchrun (DDP: every rank reads its shard of each epoch).

`checkpoint.pth` in the output directory is written at every epoch end (atomically); running the same command again
continues from the last finished epoch (an interrupted epoch is redone), and a directory holding a run with other
settings is refused.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mugs_fast.checkpoint import atomic_save
from mugs_fast.distributed import get_rank, get_world_size, is_distributed
from mugs_fast.linear_features import FeatureSpec, probe_features, state_digest

# the release's eval_linear.sh: base lr per recipe (per 256 images) and images per GPU
RECIPE_LRS = {"vit_small_100ep": 0.015, "vit_small_300ep": 0.02, "vit_small_800ep": 0.01, "vit_base_400ep": 0.002}


def release_lr(arch: str, recipe: str = "") -> float:
    """The release's base lr: its recipe's, else 0.015 (ViT-Ti/S, as S-100) or 0.002 (ViT-B/L, as B)."""
    return RECIPE_LRS.get(recipe, 0.002 if arch in ("vit_base", "vit_large") else 0.015)


def release_batch(arch: str) -> int:
    """The release's images per GPU: 256, or 128 for ViT-B/L."""
    return 128 if arch in ("vit_base", "vit_large") else 256


class AugmentedProbeError(ValueError):
    """The output directory holds another run (one-line message)."""


@dataclass(frozen=True)
class AugmentedSettings:
    """What the run is (a resumed run must match it) and how it is driven."""

    lr: float  # per 256 images
    batch_size: int  # per process
    epochs: int = 100
    seed: int = 0
    max_steps: int = 0  # stop after this many steps in total (0: all epochs); checkpoints stay at epoch ends
    num_threads: int | None = None


def train_augmented(
    backbone: nn.Module,
    train_path: Path,
    val_path: Path,
    spec: FeatureSpec,
    num_classes: int,
    settings: AugmentedSettings,
    output_dir: Path,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains (or resumes) the release's probe on `backbone` (frozen, on its device); the val accuracies when all
    epochs are done, else {"stopped_at_epoch": e}. Every rank must call it."""
    from mugs_fast.data.linear_loader import AugmentedLoader

    device = next(backbone.parameters()).device
    world = get_world_size()
    dim = (spec.n_last_blocks + spec.avgpool_patchtokens) * backbone.embed_dim
    classifier, optimizer, schedule = _build(dim, num_classes, settings, world, device)
    identity = {**asdict(settings), "world_size": world, "features": asdict(spec), "weights": state_digest(backbone)}
    for k in ("max_steps", "num_threads"):  # how the run is driven, not what it is
        identity.pop(k)
    start_epoch = _resume(output_dir / "checkpoint.pth", identity, classifier, optimizer, schedule)
    dtype = getattr(torch, spec.dtype)
    loader = AugmentedLoader(
        train_path,
        settings.batch_size,
        size=spec.crop_size,
        device=device,
        seed=settings.seed,
        rank=get_rank(),
        world_size=world,
        dtype=dtype,
        num_threads=settings.num_threads,
    )
    step, t0 = start_epoch * len(loader), time.perf_counter()
    for epoch in tqdm(range(start_epoch, settings.epochs), desc="augmented probe", unit="epoch", disable=not progress):
        loader.set_epoch(epoch)
        for images, labels in loader:
            if settings.max_steps and step >= settings.max_steps:
                return {"stopped_at_epoch": epoch, "step": step}
            _train_step(backbone, classifier, optimizer, spec, images, labels)
            step += 1
        schedule.step()
        if get_rank() == 0:
            state = {
                "classifier": _unwrap(classifier).state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "epoch": epoch + 1,
                "identity": identity,
            }
            atomic_save(state, output_dir / "checkpoint.pth")
    train_seconds = time.perf_counter() - t0
    top1, top5, val_samples = _evaluate(backbone, _unwrap(classifier), val_path, spec, settings)
    return {
        "mode": "augmented",
        "top1": top1,
        "top5": top5,
        "lr": settings.lr,
        "effective_lr": settings.lr * settings.batch_size * world / 256,
        "batch_size_per_gpu": settings.batch_size,
        "world_size": world,
        "epochs": settings.epochs,
        "resumed_from_epoch": start_epoch,
        "train_samples": len(loader) * settings.batch_size * world,
        "val_samples": val_samples,
        "num_classes": num_classes,
        "seconds": {"train": round(train_seconds, 2)},
    }


def _build(dim: int, num_classes: int, settings: AugmentedSettings, world: int, device: torch.device) -> tuple:
    """(classifier (DDP-wrapped under torchrun), SGD, cosine schedule): the release's."""
    classifier = nn.Linear(dim, num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(settings.seed))
        classifier.bias.zero_()
    classifier = classifier.to(device)
    if is_distributed():
        classifier = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device] if device.type == "cuda" else None
        )
    lr = settings.lr * settings.batch_size * world / 256
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    return classifier, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs, eta_min=0)


def _unwrap(classifier: nn.Module) -> nn.Module:
    return classifier.module if isinstance(classifier, nn.parallel.DistributedDataParallel) else classifier


def _resume(path: Path, identity: dict, classifier: nn.Module, optimizer, schedule) -> int:
    """Loads a checkpoint of the same run if there is one; the epoch to start from."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["identity"] != identity:
        changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        raise AugmentedProbeError(
            f"{path} holds a run with other settings ({', '.join(changed)}): use another --output_dir"
        )
    _unwrap(classifier).load_state_dict(state["classifier"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["epoch"])


def _train_step(backbone, classifier, optimizer, spec: FeatureSpec, images, labels) -> None:
    """One SGD step of the classifier on a batch; the backbone runs frozen (no graph)."""
    with (
        torch.no_grad(),
        torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.dtype == torch.bfloat16),
    ):
        features = probe_features(backbone, images, spec.n_last_blocks, spec.avgpool_patchtokens).float()  # (B, D')
    loss = F.cross_entropy(classifier(features), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _evaluate(backbone, classifier, val_path: Path, spec: FeatureSpec, settings) -> tuple[float, float, int]:
    """Top-1 / top-5 (%) on val's centre crops and the number of val images, summed over the ranks."""
    from mugs_fast.data.eval_loader import EvalLoader

    device = next(backbone.parameters()).device
    loader = EvalLoader(
        val_path,
        settings.batch_size,
        crop_size=spec.crop_size,
        device=device,
        rank=get_rank(),
        world_size=get_world_size(),
        num_threads=settings.num_threads,
    )
    counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16"):
            features = probe_features(backbone, images, spec.n_last_blocks, spec.avgpool_patchtokens).float()
        logits, keep = classifier(features), labels >= 0  # label -1: padding, undecodable
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (b, 5)
        counts += torch.stack([(top[:, 0] & keep).sum(), (top.any(1) & keep).sum(), keep.sum()])
    if is_distributed():
        dist.all_reduce(counts)
    hits1, hits5, n = counts.tolist()
    return 100.0 * hits1 / max(n, 1), 100.0 * hits5 / max(n, 1), n
