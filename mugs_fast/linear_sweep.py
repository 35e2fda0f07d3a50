"""The fast linear probe's sweep: a grid of linear classifiers (learning rates x weight decays) trained at once on
frozen features, one batched matrix product per step.

Each classifier is the release's (spec 10.2): `Linear(D, C)` with weights N(0, 0.01) and a zero bias, SGD with
momentum 0.9, the learning rate given per 256 images (lr * B / 256) and annealed per epoch to 0 by a cosine
(`CosineAnnealingLR(optimizer, epochs)`); the weight decay applies to the weights and the bias, as
`torch.optim.SGD` over the layer's parameters does. All classifiers see the same batches: one seeded permutation
of the training images per epoch, each image as one of its stored views (centre crop or its flip) drawn per
epoch. Training classifier g alone on those batches with torch.optim.SGD gives the same weights
(tests/test_linear.py).

With `standardize` (the CLI's default), the classifiers take the features standardised per dimension by the mean
and standard deviation of the training rows (as MAE's BatchNorm without affine before its probe). The release
feeds raw features: a linear map of standardised features is no more expressive, but SGD converges far better
when a few constant dimensions dominate the raw ones (post-LayerNorm features of a short or collapsed run).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

MOMENTUM = 0.9
INIT_STD = 0.01  # the release's classifier init
DEFAULT_LRS = (0.003, 0.01, 0.03, 0.1, 0.3)  # per 256 images; the release's ViT-S/B lrs: 0.002-0.02
DEFAULT_WDS = (0.0, 1e-5, 1e-4, 1e-3)


@dataclass
class Grid:
    """The classifiers of a sweep: weights (G, C, D) and biases (G, C) fp32, for the (lr, wd) pairs of `points`."""

    weight: torch.Tensor
    bias: torch.Tensor
    points: list[tuple[float, float]]
    mean: torch.Tensor | None = None  # (D,) fp32: with these two, the classifiers take (x - mean) * inv_std
    inv_std: torch.Tensor | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, D) as the classifiers take them."""
        return x if self.mean is None else (x.float() - self.mean) * self.inv_std


@torch.no_grad()
def feature_stats(views: torch.Tensor, rows: np.ndarray, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std), each (D,) fp32, of every view of the images `rows` of `views` (V, N, D); summed in fp64 by
    chunks (the features may not fit in memory twice). A constant dimension gets 1 / std = 0."""
    sums = torch.zeros(2, views.shape[-1], dtype=torch.float64, device=views.device)
    rows_t = torch.as_tensor(rows, device=views.device)
    for start in range(0, len(rows), chunk):
        x = views[:, rows_t[start : start + chunk]].double()  # (V, c, D)
        sums += torch.stack([x.sum((0, 1)), x.square().sum((0, 1))])
    n = views.shape[0] * len(rows)
    mean = sums[0] / n
    std = (sums[1] / n - mean.square()).clamp_min(0).sqrt()
    inv_std = torch.where(std > 1e-6 * mean.abs().clamp_min(1), 1 / std, torch.zeros_like(std))
    return mean.float(), inv_std.float()


def grid_points(lrs: tuple[float, ...], wds: tuple[float, ...]) -> list[tuple[float, float]]:
    """(lr, wd) of each classifier, lr-major."""
    return [(lr, wd) for lr in lrs for wd in wds]


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows), disjoint, sorted, covering range(N): `fraction` of each class held out
    (rounded; at least one image of every class with two or more, never all of a class). Depends only on the
    labels, the fraction and the seed."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within each class
    counts = np.bincount(labels)
    take = np.clip(np.round(counts * fraction), np.minimum(counts - 1, 1), np.maximum(counts - 1, 0))
    within = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)  # rank inside its class
    held = within < take[labels[order]]
    return np.sort(order[~held]), np.sort(order[held])


def epoch_order(num_rows: int, num_views: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, views) of one epoch: a permutation of range(num_rows) from (seed, epoch), and for each position
    the view (in range(num_views)) it is read as."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_rows), rng.integers(0, num_views, num_rows)


def epoch_batches(
    num_rows: int, batch_size: int, num_views: int, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches (positions (b,), views (b,)) of one epoch's `epoch_order`; the last batch may be smaller."""
    order, views = epoch_order(num_rows, num_views, seed, epoch)
    for start in range(0, num_rows, batch_size):
        yield order[start : start + batch_size], views[start : start + batch_size]


def cosine_factor(epoch: int, epochs: int) -> float:
    """CosineAnnealingLR's factor (eta_min 0) during `epoch`."""
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def init_grid(num_classifiers: int, dim: int, num_classes: int, seed: int, device: torch.device) -> tuple:
    """(weights (G, C, D), biases (G, C)): the release's init, drawn on the CPU from `seed`."""
    g = torch.Generator().manual_seed(seed)
    weight = INIT_STD * torch.randn(num_classifiers, num_classes, dim, generator=g)
    return weight.to(device), torch.zeros(num_classifiers, num_classes, device=device)


def grid_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Features (B, D) -> logits (B, G, C) of every classifier, as one matrix product with the G classifiers'
    weights stacked: (B, D) x (D, G * C). (A batched product over G of the broadcast features, with
    F.cross_entropy, took 146 ms a step against 9 ms for this on one CPU core at G = 20, C = 10, D = 768, B = 1024.)"""
    num_classifiers, num_classes, dim = weight.shape
    logits = torch.addmm(bias.reshape(-1), x, weight.reshape(-1, dim).t())  # (B, G * C)
    return logits.view(len(x), num_classifiers, num_classes)


def train_grid(
    views: torch.Tensor,
    labels: torch.Tensor,
    rows: np.ndarray,
    *,
    lrs: tuple[float, ...],
    wds: tuple[float, ...],
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    standardize: bool = False,
    progress: bool = False,
) -> Grid:
    """Trains the grid of classifiers on the images `rows` of `views` (V, N, D) / `labels` (N,) (on one device).

    bf16 features (GPU) make the products run under bf16 autocast; weights, momenta and the loss stay fp32.
    """
    device = views.device
    points = grid_points(lrs, wds)
    weight, bias = init_grid(len(points), views.shape[-1], num_classes, seed, device)
    grid = Grid(weight, bias, points, *(feature_stats(views, rows) if standardize else ()))
    params = [weight.requires_grad_(), bias.requires_grad_()]
    momenta = [torch.zeros_like(weight), torch.zeros_like(bias)]
    lr = torch.tensor([p[0] for p in points], device=device) * batch_size / 256  # (G,)
    wd = torch.tensor([p[1] for p in points], device=device)
    rows_t = torch.as_tensor(rows, device=device)
    bf16 = views.dtype == torch.bfloat16
    bar = tqdm(range(epochs), desc="sweep", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        # the epoch's batches as `epoch_batches` cuts them, copied to the device at once (a copy per step would
        # wait for the previous step)
        order, view_of = (torch.as_tensor(a, device=device) for a in epoch_order(len(rows), len(views), seed, epoch))
        image_rows, epoch_lr = rows_t[order], lr * cosine_factor(epoch, epochs)
        loss_sum = torch.zeros(len(points), device=device)
        for start in range(0, len(rows), batch_size):
            batch, view = image_rows[start : start + batch_size], view_of[start : start + batch_size]
            x, y = grid.inputs(views[view, batch]), labels[batch]  # (b, D), (b,)
            loss_sum += _sgd_step(params, momenta, x, y, epoch_lr, wd, bf16).detach()
        if progress:  # once per epoch: reads the losses (sync)
            bar.set_postfix(best_loss=f"{loss_sum.min().item() / math.ceil(len(rows) / batch_size):.4f}")
    return Grid(weight.detach(), bias.detach(), points, grid.mean, grid.inv_std)


def _autocast(features: torch.Tensor, enabled: bool | None = None):
    """bf16 autocast when the stored features are bf16 (extracted on a GPU), so the products run in bf16."""
    enabled = features.dtype == torch.bfloat16 if enabled is None else enabled
    return torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=enabled)


def _sgd_step(
    params: list[torch.Tensor], momenta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, lr, wd, bf16: bool
) -> torch.Tensor:
    """One SGD step of every classifier on the batch (x (b, D), y (b,)); returns each one's loss (G,)."""
    with _autocast(x, bf16):
        logits = grid_logits(*params, x)  # (b, G, C)
    log_p = torch.log_softmax(logits.float(), dim=2)
    losses = -log_p.gather(2, y.view(-1, 1, 1).expand(-1, log_p.shape[1], 1)).mean((0, 2))  # cross-entropy (G,)
    grads = torch.autograd.grad(losses.sum(), params)  # classifier g's gradient comes from its own loss only
    with torch.no_grad():
        for p, m, g in zip(params, momenta, grads, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            m.mul_(MOMENTUM).add_(g + wd.view(shape) * p)  # torch.optim.SGD: buf = 0.9 buf + (grad + wd p)
            p.sub_(lr.view(shape) * m)
    return losses


@torch.no_grad()
def grid_accuracy(grid: Grid, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, ...]:
    """Top-1 and top-5 accuracy (%) of every classifier (each (G,), on the CPU) on features x (M, D), labels (M,)."""
    top = min(5, grid.weight.shape[1])
    correct = torch.zeros(2, len(grid.points), dtype=torch.long, device=x.device)
    for start in range(0, len(y), chunk):
        xs, ys = grid.inputs(x[start : start + chunk]), y[start : start + chunk]
        with _autocast(x):
            logits = grid_logits(grid.weight, grid.bias, xs)  # (m, G, C)
        hits = logits.float().topk(top, dim=2).indices == ys.view(-1, 1, 1)  # (m, G, top)
        correct += torch.stack([hits[..., 0].sum(0), hits.any(dim=2).sum(0)])
    accuracy = 100.0 * correct.cpu().double() / max(len(y), 1)
    return accuracy[0], accuracy[1]
