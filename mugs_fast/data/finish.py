"""The torch end of the multi-crop pipeline: uint8 crops from DALI -> normalised training tensors.

One call per resolution, batched over all crops of that resolution (no per-crop Python loop): colour jitter
and grayscale (one 3x3 affine map per crop, from the plan), solarisation, random erasing with per-pixel
Gaussian noise on [0, 1] values (before normalisation, as the release), ImageNet normalisation and the
output dtype. DALI has no bf16 output, and these are cheap elementwise ops on the device.
"""

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 127.5 / 255  # PIL's solarize(128) on values rounded to uint8


def finish_crops(
    crops: torch.Tensor, plan, rows: slice, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """crops: (B, k, S, S, 3) uint8 on the device (DALI's layout) for plan slots `rows` (k of them).

    Returns (k * B, 3, S, S) in `dtype`, crop-major (all images' crop 0, then crop 1, ...).
    generator: draws the erasing noise (on the crops' device).
    """
    device = crops.device
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
    x = crops.permute(1, 0, 4, 2, 3).float().div_(255)  # (k, B, 3, S, S)
    k, b, _, size, _ = x.shape

    colour = as_tensor(plan.colour[rows])  # (k, B, 3, 3)
    shift = as_tensor(plan.contrast_shift[rows])  # (k, B)
    mean_luma = x.mean((-1, -2)) @ torch.tensor(LUMA, device=device)  # (k, B)
    x = torch.einsum("kbij,kbjhw->kbihw", colour, x)
    x.add_((shift * mean_luma)[..., None, None, None]).clamp_(0, 1)

    k_idx, b_idx = _where(plan.solarize[rows], device)  # few crops: index them, not the whole batch
    if len(k_idx):
        picked = x[k_idx, b_idx]
        x[k_idx, b_idx] = torch.where(picked >= SOLARIZE_THRESHOLD, 1 - picked, picked)

    _erase(x, plan.erase[rows], generator)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return x.sub_(mean).div_(std).to(dtype).reshape(k * b, 3, size, size)


def _where(flags: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of a host-side (k, B) plan array, on the device (no device sync)."""
    return tuple(torch.from_numpy(i).to(device, non_blocking=True) for i in np.nonzero(flags))


def _erase(x: torch.Tensor, boxes: np.ndarray, generator: torch.Generator) -> None:
    """In place: the boxes (k, B, 4: top, left, height, width; height 0 = none) of x (k, B, 3, S, S) get N(0, 1)."""
    on = boxes[..., 2] > 0
    if not on.any():
        return
    size = x.shape[-1]
    k_t, b_t = _where(on, x.device)
    box = torch.from_numpy(boxes[on].astype(np.int64)).to(x.device, non_blocking=True)
    ys = torch.arange(size, device=x.device)
    inside_y = (ys >= box[:, :1]) & (ys < box[:, :1] + box[:, 2:3])  # (n, S)
    inside_x = (ys >= box[:, 1:2]) & (ys < box[:, 1:2] + box[:, 3:4])
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (n, 1, S, S)
    noise = torch.randn((len(box), 3, size, size), generator=generator, device=x.device)
    x[k_t, b_t] = torch.where(mask, noise, x[k_t, b_t])
