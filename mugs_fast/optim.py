"""Optimisation (spec 6): parameter groups, precomputed schedules, per-tensor clipping, last-layer freeze, EMA.

Schedules are host-side arrays indexed by the global step, so setting a learning rate never touches the GPU.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mugs_fast.config import MugsConfig


def param_groups(model: nn.Module) -> list[dict]:
    """The release's 4 groups: regularised, patch-embed weight (0.2x lr), no-wd (biases, 1-D), patch-embed bias."""
    names = ("normal_params", "patch_embed", "no_wd", "patch_embed_no_wd")
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in names}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = name.endswith(".bias") or p.ndim == 1  # biases and norm parameters
        if "patch_embed" in name:
            groups["patch_embed_no_wd" if no_wd else "patch_embed"].append(p)
        else:
            groups["no_wd" if no_wd else "normal_params"].append(p)
    return [
        {"name": "normal_params", "params": groups["normal_params"]},
        {"name": "patch_embed", "params": groups["patch_embed"]},
        {"name": "no_wd", "params": groups["no_wd"], "apply_wd": False, "weight_decay": 0.0},
        {"name": "patch_embed_no_wd", "params": groups["patch_embed_no_wd"], "apply_wd": False, "weight_decay": 0.0},
    ]


class LARS(torch.optim.Optimizer):
    """LARS as in the release (Barlow Twins' version): no weight decay or adaptation for 1-D parameters."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(d_norm > 0, g["eta"] * p_norm / d_norm, one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(cfg: MugsConfig, student: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the student's trainable parameters (build it after moving the model to its device)."""
    groups = param_groups(student)
    if cfg.optimizer == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, fused=on_cuda or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    return LARS(groups)


def cosine_schedule(
    base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warm-up to `base` (endpoint included), then cosine from `base` to `final`."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters)
    i = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / len(i)))
    return np.concatenate([warmup, cosine])


@dataclass
class Schedules:
    """Host-side per-step values (float64 arrays of length epochs * iters_per_epoch)."""

    iters_per_epoch: int
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray  # per epoch in the release, repeated over the epoch's steps here

    def __len__(self) -> int:
        return len(self.lr)


def build_schedules(cfg: MugsConfig, iters_per_epoch: int, world_size: int = 1) -> Schedules:
    """Schedules of a run with `iters_per_epoch` steps per epoch and a global batch of batch_size_per_gpu*W."""
    peak_lr = cfg.lr * cfg.batch_size_per_gpu * world_size / 256.0  # linear scaling rule
    warm = cfg.group_warmup_teacher_temp_epochs
    temp_per_epoch = np.concatenate(
        [
            np.linspace(cfg.group_warmup_teacher_temp, cfg.group_teacher_temp, warm),
            np.full(cfg.epochs - warm, cfg.group_teacher_temp),
        ]
    )
    return Schedules(
        iters_per_epoch=iters_per_epoch,
        lr=cosine_schedule(peak_lr, cfg.min_lr, cfg.epochs, iters_per_epoch, cfg.warmup_epochs),
        wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters_per_epoch),
        momentum=cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, iters_per_epoch),
        teacher_temp=np.repeat(temp_per_epoch, iters_per_epoch),
    )


def apply_schedules(
    optimizer: torch.optim.Optimizer, schedules: Schedules, step: int, patch_embed_lr_mult: float
) -> tuple[float, float]:
    """Set every group's lr (x mult for patch-embed groups) and weight decay (regularised groups) for `step`."""
    lr, wd = float(schedules.lr[step]), float(schedules.wd[step])
    for group in optimizer.param_groups:
        group["lr"] = lr * (patch_embed_lr_mult if "patch_embed" in group["name"] else 1.0)
        if group.get("apply_wd", True):
            group["weight_decay"] = wd
    return lr, wd


def clip_threshold(cfg: MugsConfig, epoch: int) -> float:
    """The clip norm of an epoch: clip_grad, divided by 10 for vit_large after epoch 100 (hard-coded upstream)."""
    return cfg.clip_grad / 10.0 if (cfg.arch == "vit_large" and epoch > 100) else cfg.clip_grad


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """Per-tensor clipping: each grad with norm > max_norm is scaled by max_norm / (norm + 1e-6).

    Returns the grad norms before clipping (on the device; no sync), or None when no parameter has a grad.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    scales = torch.clamp(max_norm / (norms + 1e-6), max=1.0)  # 1 (an exact no-op) where norm <= max_norm
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """Drop the grads of the group head's last layer (AdamW then skips it entirely, weight decay included)."""
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over paired lists, with foreach kernels."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
