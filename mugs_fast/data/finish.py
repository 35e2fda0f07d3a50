"""The torch end of the multi-crop pipeline: uint8 crops from DALI -> normalised training tensors.

One call per resolution, batched over all crops of that resolution (no per-crop Python loop): colour jitter
and grayscale (one 3x3 affine map per crop, from the plan), solarisation, random erasing with per-pixel
Gaussian noise on [0, 1] values (before normalisation, as the release), ImageNet normalisation and the
output dtype. DALI has no bf16 output, and these are cheap elementwise ops on the device.

Nothing here waits for the GPU: the constants live on the device from the start (`CropFinisher`), and the
per-batch host arrays (the plan's parameters, labels, flags) reach it in one asynchronous copy (`to_device`).
"""

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 127.5 / 255  # PIL's solarize(128) on values rounded to uint8
_ALIGN = 8  # bytes: every array of a packed copy starts at a multiple of the largest element size


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Small host arrays -> tensors on `device` (same names, shapes and dtypes) without a host-device sync.

    The arrays are packed into one buffer, which is pinned and copied with one non-blocking copy: a copy
    from pageable memory, or a plain `.to(device)`, would make the host wait for the GPU. torch's caching
    host allocator keeps the pinned buffer until the copy has run. The tensors are views of one buffer (on the
    CPU too): clone one that is kept or saved on its own.
    """
    offsets, total = {}, 0
    for name, a in arrays.items():
        offsets[name] = total
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    packed = np.zeros(max(total, _ALIGN), np.uint8)
    for name, a in arrays.items():
        packed[offsets[name] : offsets[name] + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    host = torch.from_numpy(packed)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    out = {}
    for name, a in arrays.items():
        raw = host[offsets[name] : offsets[name] + a.nbytes]
        out[name] = raw.view(_torch_dtype(a.dtype)).view(a.shape)
    return out


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def finish_arrays(plan, rows: slice) -> dict[str, np.ndarray]:
    """The plan's parameters of the torch ops for its crop slots `rows` (k of them), for `to_device`.

    colour (k, B, 3, 3), shift (k, B): the jitter's affine map; solarize (2, n): (slot, image) of the n
    solarised crops; erased (2, m) and boxes (m, 4: top, left, height, width): the m erased crops.
    """
    erase = plan.erase[rows]
    on = erase[..., 2] > 0
    return {
        "colour": plan.colour[rows],
        "shift": plan.contrast_shift[rows],
        "solarize": np.stack(np.nonzero(plan.solarize[rows])).astype(np.int64),
        "erased": np.stack(np.nonzero(on)).astype(np.int64),
        "boxes": erase[on].astype(np.int64),
    }


class CropFinisher:
    """The torch ops after DALI for one device and output dtype (their constants made once, on the device)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.dtype = dtype
        self.luma = torch.tensor(LUMA, device=device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    def __call__(
        self, crops: torch.Tensor, params: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """crops: (k, B, S, S, 3) uint8 on the device (crop-major, DALI's HWC); params: `finish_arrays` on it.

        Returns (k * B, 3, S, S) in the output dtype, crop-major (all images' crop 0, then crop 1, ...).
        generator: draws the erasing noise (on the crops' device).
        """
        x = crops.permute(0, 1, 4, 2, 3).float().div_(255)  # (k, B, 3, S, S)
        k, b, _, size, _ = x.shape
        mean_luma = x.mean((-1, -2)) @ self.luma  # (k, B)
        x = torch.einsum("kbij,kbjhw->kbihw", params["colour"], x)
        x.add_((params["shift"] * mean_luma)[..., None, None, None]).clamp_(0, 1)

        k_idx, b_idx = params["solarize"]  # few crops: index them, not the whole batch
        if len(k_idx):
            picked = x[k_idx, b_idx]
            x[k_idx, b_idx] = torch.where(picked >= SOLARIZE_THRESHOLD, 1 - picked, picked)
        _erase(x, params["erased"], params["boxes"], generator)
        return x.sub_(self.mean).div_(self.std).to(self.dtype).reshape(k * b, 3, size, size)


def _erase(x: torch.Tensor, where: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator) -> None:
    """In place: crops x[where[0], where[1]] of x (k, B, 3, S, S) get N(0, 1) noise inside their boxes (m, 4)."""
    if not len(boxes):  # a host-side shape: no sync
        return
    size = x.shape[-1]
    ys = torch.arange(size, device=x.device)
    inside_y = (ys >= boxes[:, :1]) & (ys < boxes[:, :1] + boxes[:, 2:3])  # (m, S)
    inside_x = (ys >= boxes[:, 1:2]) & (ys < boxes[:, 1:2] + boxes[:, 3:4])
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (m, 1, S, S)
    noise = torch.randn((len(boxes), 3, size, size), generator=generator, device=x.device)
    k_idx, b_idx = where
    x[k_idx, b_idx] = torch.where(mask, noise, x[k_idx, b_idx])
