"""Every random choice of the multi-crop augmentation of one batch, drawn on the host with numpy.

The DALI graph and the torch finishing step take all their randomness from a `CropPlan`: crop windows and
flips, the weak/strong coins, the RandAugment ops, magnitudes and signs, blur sigmas, colour-jitter
matrices, solarisation and random-erasing boxes. A plan is a pure function of (seed, epoch, rank, batch
index) and the images' sizes, so the same seed gives the same augmentations on CPU and GPU, with any
prefetch depth, and a resumed run continues with the augmentations it would have drawn.

Crop slots, crop-major like the loader's output (K = 4 + local_crops_number):
    0, 1   teacher weak-1 (blur p=1.0), weak-2 (blur p=0.1, solarize p=0.2)           global size
    2, 3   student globals: one coin per image; strong both, or fresh weak-1 / weak-2  global size
    4..    student locals: each strong with p=0.5, else weak-local (blur p=0.5)        local size
The distributions are those of the release (`src/multicropdataset.py`, torchvision, timm); see
`mugs_fast.data.dali_pipeline` for where the implementation deviates from it.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mugs_fast.data.contract import CropSpec  # which imports this module's defaults

GLOBAL_SCALE, LOCAL_SCALE, RATIO = (0.25, 1.0), (0.05, 0.25), (3 / 4, 4 / 3)
STRONG_P = 0.5
# weak (DINO): ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, RandomGrayscale(0.2), GaussianBlur radius U(0.1, 2)
JITTER_P, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY_P = 0.8, 0.4, 0.4, 0.2, 0.1, 0.2
BLUR_SIGMA, SOLARIZE_P = (0.1, 2.0), 0.2
# strong: timm RandAugment 'rand-m9-mstd0.5-inc1' (2 distinct ops, each applied with p=0.5, level ~N(9, 0.5)
# clipped to [0, 10]), levels quantised to 0.1 (LEVEL_BINS bins); then RandomErasing(0.25, 'pixel')
RA_NUM_OPS, RA_IDENTITY, RA_LAYERS, RA_OP_P, RA_MAGNITUDE, RA_MAGNITUDE_STD = 15, 15, 2, 0.5, 9.0, 0.5
LEVEL_BINS = 101
RA_FILL = (124, 116, 104)  # fill of the geometric ops: the release's img_mean, round(255 * ImageNet mean)
ERASE_P, ERASE_AREA, ERASE_ASPECT = 0.25, (0.02, 1 / 3), (0.3, 1 / 0.3)

# RGB <-> YIQ (Y = BT.601 luma, as PIL's 'L'): saturation scales I and Q, hue rotates them
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


@dataclass
class CropPlan:
    """Random parameters of one batch; arrays are crop-major: (K, B, ...)."""

    roi: np.ndarray  # (K, B, 4) float32 source window y0, x0, y1, x1 in pixels; x0 > x1 when flipped
    strong: np.ndarray  # (K, B) bool
    ra_op: np.ndarray  # (K, B, 2) int32 op index per RandAugment layer; RA_IDENTITY when not applied
    ra_bin: np.ndarray  # (K, B, 2) int32 level bin, level = bin / 10
    ra_sign: np.ndarray  # (K, B, 2) int32 1 = negate the op's argument
    blur: np.ndarray  # (K, B) float32 Gaussian sigma, 0 = no blur
    colour: np.ndarray  # (K, B, 3, 3) float32 colour-jitter + grayscale matrix on RGB (identity: none)
    contrast_shift: np.ndarray  # (K, B) float32 weight of the crop's mean luma added to every channel
    solarize: np.ndarray  # (K, B) bool
    erase: np.ndarray  # (K, B, 4) int32 box top, left, height, width in output pixels; height 0 = none
    size: np.ndarray  # (K,) int64 side of each slot's square crop in pixels

    @property
    def weak(self) -> np.ndarray:
        """(B,) bool: the student's global crops are weak."""
        return ~self.strong[2]


def plan_rng(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank, batch])


def sample_plan(
    rng: np.random.Generator,
    heights: np.ndarray,
    widths: np.ndarray,
    crops: "CropSpec",
) -> CropPlan:
    """Draws the plan of a batch of images with these sizes (pixels, (B,) each): `crops` gives the crops' number
    and sizes and the augmentation's free parameters (crop scales, P(strong), P(erase))."""
    local_crops_number, global_size, local_size = crops.local_crops_number, crops.global_size, crops.local_size
    strong_p, erase_p = crops.strong_p, crops.erase_p
    batch, num_crops = len(heights), 4 + local_crops_number
    strong = np.zeros((num_crops, batch), bool)
    strong[2:4] = rng.random(batch) < strong_p
    strong[4:] = rng.random((local_crops_number, batch)) < strong_p
    weak = ~strong

    scale = np.array([crops.global_scale] * 4 + [crops.local_scale] * local_crops_number)[:, None, :]
    roi = _crop_windows(rng, np.broadcast_to(heights, strong.shape), np.broadcast_to(widths, strong.shape), scale)

    blur_p = np.array([1.0, 0.1, 1.0, 0.1] + [0.5] * local_crops_number)[:, None]
    blur_on = weak & (rng.random(strong.shape) < blur_p)
    blur = np.where(blur_on, rng.uniform(*BLUR_SIGMA, strong.shape), 0.0).astype(np.float32)

    solarize = np.zeros_like(strong)
    solarize[[1, 3]] = weak[[1, 3]] & (rng.random((2, batch)) < SOLARIZE_P)

    colour, contrast_shift = _colour_jitter(rng, weak)
    ra_op, ra_bin, ra_sign = _rand_augment(rng, strong)
    sizes = np.array([global_size] * 4 + [local_size] * local_crops_number)
    erase = _erase_boxes(rng, strong, sizes[:, None], erase_p)
    return CropPlan(roi, strong, ra_op, ra_bin, ra_sign, blur, colour, contrast_shift, solarize, erase, sizes)


def _crop_windows(rng, heights, widths, scale) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorised (10 tries, then a centre crop), plus a flip."""
    heights, widths = heights.astype(np.int64), widths.astype(np.int64)
    tries = 10
    area = (heights * widths)[..., None]
    target = area * rng.uniform(scale[..., :1], scale[..., 1:], heights.shape + (tries,))
    log_ratio = np.log(RATIO)
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], heights.shape + (tries,)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= widths[..., None]) & (h > 0) & (h <= heights[..., None])
    first = ok.argmax(-1)[..., None]
    found = ok.any(-1)
    h, w = np.take_along_axis(h, first, -1)[..., 0], np.take_along_axis(w, first, -1)[..., 0]

    in_ratio = widths / heights
    fallback_w = np.where(in_ratio > RATIO[1], np.round(heights * RATIO[1]), widths).astype(np.int64)
    fallback_h = np.where(in_ratio < RATIO[0], np.round(widths / RATIO[0]), heights).astype(np.int64)
    h, w = np.where(found, h, fallback_h), np.where(found, w, fallback_w)
    top = np.where(found, (rng.random(h.shape) * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
    left = np.where(found, (rng.random(w.shape) * (widths - w + 1)).astype(np.int64), (widths - w) // 2)

    flip = rng.random(h.shape) < 0.5
    x0, x1 = np.where(flip, left + w, left), np.where(flip, left, left + w)
    return np.stack([top, x0, top + h, x1], -1).astype(np.float32)


def _colour_jitter(rng, weak) -> tuple[np.ndarray, np.ndarray]:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 then RandomGrayscale(0.2), on weak crops (identity on strong)."""
    shape = weak.shape
    on = weak & (rng.random(shape) < JITTER_P)
    b = np.where(on, rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, shape), 1.0)
    c = np.where(on, rng.uniform(1 - CONTRAST, 1 + CONTRAST, shape), 1.0)
    s = np.where(on, rng.uniform(1 - SATURATION, 1 + SATURATION, shape), 1.0)
    hue = np.where(on, rng.uniform(-HUE, HUE, shape), 0.0)
    gray = weak & (rng.random(shape) < GRAY_P)
    return colour_affine(b, c, s, hue, gray)


def colour_affine(b, c, s, hue, gray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness b, contrast c, saturation s, hue (turns) and grayscale as one affine map per crop.

    out = A x + shift * mean_luma(x), with A = c b M, shift = (1 - c) b, M = YIQ^-1 diag(1, s, s) rot(hue) YIQ
    (gray: s = 0). Brightness scales, contrast blends with the mean luma (as torchvision), saturation blends
    with the luma (PIL's Color), hue rotates YIQ chroma; these commute, so their order does not matter.
    Returns A (..., 3, 3) and shift (...), float32.
    """
    s = np.where(gray, 0.0, s)
    theta = 2 * np.pi * np.asarray(hue)
    chroma = np.zeros(np.shape(theta) + (3, 3))
    chroma[..., 0, 0] = 1.0
    chroma[..., 1, 1] = chroma[..., 2, 2] = s * np.cos(theta)
    chroma[..., 1, 2], chroma[..., 2, 1] = -s * np.sin(theta), s * np.sin(theta)
    m = YIQ_TO_RGB @ chroma @ RGB_TO_YIQ
    m[(s == 1) & (theta == 0)] = np.eye(3)
    return ((c * b)[..., None, None] * m).astype(np.float32), ((1 - c) * b).astype(np.float32)


def _rand_augment(rng, strong) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two distinct ops (the release's RandAugment draws without replacement), each applied with p=0.5."""
    shape = strong.shape
    first = rng.integers(RA_NUM_OPS, size=shape)
    second = rng.integers(RA_NUM_OPS - 1, size=shape)
    second += second >= first
    op = np.stack([first, second], -1)
    applied = strong[..., None] & (rng.random(op.shape) < RA_OP_P)
    op = np.where(applied, op, RA_IDENTITY).astype(np.int32)
    level = np.clip(rng.normal(RA_MAGNITUDE, RA_MAGNITUDE_STD, op.shape), 0.0, 10.0)
    level_bin = np.round(level * (LEVEL_BINS - 1) / 10).astype(np.int32)
    sign = rng.integers(2, size=op.shape).astype(np.int32)
    return op, level_bin, sign


def _erase_boxes(rng, strong, sizes, p: float = ERASE_P) -> np.ndarray:
    """timm RandomErasing(p, max_count=1) boxes on size x size crops, 10 tries; height 0 = no box."""
    shape, tries = strong.shape, 10
    area = (sizes * sizes).astype(np.float64)[..., None]
    target = rng.uniform(*ERASE_AREA, shape + (tries,)) * area
    log_aspect = np.log(ERASE_ASPECT)
    aspect = np.exp(rng.uniform(log_aspect[0], log_aspect[1], shape + (tries,)))
    h = np.round(np.sqrt(target * aspect)).astype(np.int64)
    w = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (h < sizes[..., None]) & (w < sizes[..., None])
    first = ok.argmax(-1)[..., None]
    h, w = np.take_along_axis(h, first, -1)[..., 0], np.take_along_axis(w, first, -1)[..., 0]
    on = strong & (rng.random(shape) < p) & ok.any(-1)
    top = (rng.random(shape) * (sizes - h + 1)).astype(np.int64)
    left = (rng.random(shape) * (sizes - w + 1)).astype(np.int64)
    box = np.stack([top, left, h, w], -1)
    box[~on] = 0
    return box.astype(np.int32)
