"""timm's RandAugment 'rand-m9-mstd0.5-inc1', as the Mugs release configures it, in DALI.

DALI's `auto_aug.rand_augment` differs from it: its op list (no Invert or SolarizeAdd, an extra Identity),
its magnitude scale (31 bins, one fixed magnitude), no per-op probability; and one branch per op and crop
made ~3,600 DALI operators for 6 strong-capable crops (Mugs has 12), each with its per-batch overhead. So
the timm ops are grouped into five kinds, each one DALI branch with per-sample arguments that the host
computes from the plan (`ra_arguments`): the whole graph has ~1,900 operators for 4 + 10 crops.

    index  timm op                argument at level v (v in [0, 10]; +- = random sign)     kind
    0      AutoContrast           -                                                        autocontrast
    1      Equalize               -    (DALI's formula is OpenCV's; PIL's differs slightly) equalize
    2      Invert                 -                                                        colour
    3      Rotate                 +- 3 v degrees about the centre                          geometric
    4      PosterizeIncreasing    keep 4 - int(0.4 v) bits                                 colour
    5      SolarizeIncreasing     invert pixels >= 256 - int(25.6 v)                       colour
    6      SolarizeAdd            + int(11 v) to pixels < 128                              colour
    7      ColorIncreasing        blend with luma, factor f = max(0.1, 1 +- 0.09 v)        colour
    8      ContrastIncreasing     blend with the mean luma, factor f                       colour
    9      BrightnessIncreasing   scale by f                                               colour
    10     SharpnessIncreasing    blend with PIL's SMOOTH filter, factor f                 sharpness
    11,12  ShearX/Y               +- 0.03 v                                                geometric
    13,14  TranslateX/YRel        +- 0.045 v x width / height                              geometric
    15     -: the layer's op was not applied (each op applies with p = 0.5)

Geometric ops use PIL's inverse affine maps (same geometry), bilinear (timm picks bilinear or bicubic at
random), filling with the release's colour (124, 116, 104) (DALI only fills with a scalar, so the image
is shifted by the fill colour around the warp). The colour kind evaluates one formula whose per-sample
coefficients select the op, rounding to uint8 where PIL does; AutoContrast rounds where PIL truncates.
Sharpness also filters the 1-px border (PIL keeps it). Levels are quantised to 0.1.
"""

import numpy as np
from nvidia.dali import fn, math, types

from mugs_fast.data.params import RA_FILL, RA_IDENTITY, RA_LAYERS

AUTOCONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, SOLARIZE, SOLARIZE_ADD = range(7)
COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = range(7, 15)
# per-sample colour coefficients: weights of x / its luma / its mean luma, solarize threshold (256 = none,
# 0 = invert), solarize-add amount, posterize mask (255 = none)
COLOUR_FIELDS = ("alpha", "beta", "gamma", "threshold", "add", "mask")
KINDS = ("colour", "autocontrast", "sharpness", "equalize", "geometric")
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13  # PIL's ImageFilter.SMOOTH


def ra_arguments(op, level_bin, sign, heights, widths) -> dict:
    """The DALI arguments of RandAugment layers from the plan's choices.

    op, level_bin, sign: (..., RA_LAYERS) int arrays; heights, widths: broadcastable to (...).
    Returns float32 arrays: colour (..., L, 6), kernel (..., L, 3, 3), matrix (..., L, 2, 3) (destination to
    source, PIL's convention), and bool kinds (..., L, 5): which of KINDS each layer's op is.
    """
    level = level_bin / 10.0
    signed = np.where(sign == 1, -level, level)
    factor = np.maximum(0.1, 1.0 + (signed / 10.0) * 0.9)
    is_op = lambda *ops: np.isin(np.arange(RA_IDENTITY + 1), ops)[op]  # a 16-entry table, then a gather

    colour = np.zeros(op.shape + (len(COLOUR_FIELDS),))
    colour[..., 0] = np.where(is_op(COLOR, CONTRAST, BRIGHTNESS), factor, 1.0)
    colour[..., 1] = np.where(is_op(COLOR), 1.0 - factor, 0.0)
    colour[..., 2] = np.where(is_op(CONTRAST), 1.0 - factor, 0.0)
    solarize = 256 - np.minimum(256, np.floor((level / 10.0) * 256))
    colour[..., 3] = np.where(is_op(INVERT), 0, np.where(is_op(SOLARIZE), solarize, 256))
    colour[..., 4] = np.where(is_op(SOLARIZE_ADD), np.minimum(128, np.floor((level / 10.0) * 110)), 0)
    bits = 4 - np.floor((level / 10.0) * 4)
    colour[..., 5] = np.where(is_op(POSTERIZE), 256 - 2.0 ** (8 - bits), 255)  # keep the top `bits` bits

    kernel = np.where(is_op(SHARPNESS)[..., None, None], 1.0 - factor[..., None, None], 0.0) * _SMOOTH
    kernel[..., 1, 1] += np.where(is_op(SHARPNESS), factor, 1.0)

    matrix = _affine(op, signed, np.asarray(heights, float)[..., None], np.asarray(widths, float)[..., None])
    kinds = np.stack(
        [
            is_op(INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, BRIGHTNESS),
            is_op(AUTOCONTRAST),
            is_op(SHARPNESS),
            is_op(EQUALIZE),
            is_op(ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y),
        ],
        -1,
    )
    return dict(
        colour=colour.astype(np.float32),
        kernel=kernel.astype(np.float32),
        matrix=matrix.reshape(op.shape + (2, 3)).astype(np.float32),
        kinds=kinds,
    )


def _affine(op, signed, heights, widths) -> np.ndarray:
    """PIL's destination -> source maps (a, b, c, d, e, f): src = (a x + b y + c, d x + e y + f)."""
    m = np.zeros(op.shape + (6,))
    m[..., 0] = m[..., 4] = 1.0
    angle = -np.radians(3.0 * signed)  # PIL's rotate(): about (w / 2, h / 2)
    cos, sin, cx, cy = np.cos(angle), np.sin(angle), widths / 2, heights / 2
    rotate = np.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], -1)
    m = np.where((op == ROTATE)[..., None], rotate, m)
    m[..., 1] = np.where(op == SHEAR_X, 0.03 * signed, m[..., 1])
    m[..., 3] = np.where(op == SHEAR_Y, 0.03 * signed, m[..., 3])
    m[..., 2] = np.where(op == TRANSLATE_X, 0.045 * signed * widths, m[..., 2])
    m[..., 5] = np.where(op == TRANSLATE_Y, 0.045 * signed * heights, m[..., 5])
    return m


def _colour(x, c):
    """The colour-kind ops as one formula; c: the COLOUR_FIELDS coefficients of each sample (CPU)."""
    alpha, beta, gamma, threshold, add, mask = (c[i] for i in range(len(COLOUR_FIELDS)))
    luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)  # PIL's 'L'
    y = fn.cast(alpha * x + beta * luma + gamma * fn.reductions.mean(luma), dtype=types.UINT8)  # rounds, clips
    y = y ^ ((y >= threshold) * types.Constant(255, types.UINT8))  # solarize, invert: 255 - y = y xor 255
    y = y + (y < types.Constant(128, types.UINT8)) * fn.cast(add, dtype=types.UINT8)  # solarize-add
    return y & fn.cast(mask, dtype=types.UINT8)  # posterize


def _autocontrast(x):
    """PIL's autocontrast (no cutoff): each channel stretched to 0..255, a constant channel kept."""
    lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
    spread = fn.reductions.max(x, axis_names="HW", keep_dims=True) - lo
    stretched = (x - lo) * (255.0 / math.max(spread, types.Constant(1, types.UINT8))) + lo * (spread == 0)
    return fn.cast(stretched, dtype=types.UINT8)


def _warp(x, matrix):
    fill = types.Constant(np.array(RA_FILL, np.float32), device=x.device)  # GPU arithmetic: a GPU constant
    return fn.cast(fn.warp_affine(x - fill, matrix=matrix, fill_value=0.0) + fill, dtype=types.UINT8)


def rand_augment(images, colour, kernel, matrix, kinds):
    """Applies each sample's RA_LAYERS layers (`ra_arguments` per sample, one row per layer) to a uint8 HWC batch."""
    on_device = (lambda node: node.gpu()) if images.device == "gpu" else (lambda node: node)
    for layer in range(RA_LAYERS):
        kind = kinds[layer]
        if kind[0]:
            images = _colour(images, colour[layer])
        if kind[1]:
            images = _autocontrast(images)
        if kind[2]:
            images = fn.filter(images, on_device(kernel[layer]), border="clamp")
        if kind[3]:
            images = fn.equalize(images)
        if kind[4]:
            images = _warp(images, matrix[layer])
    return images


assert RA_IDENTITY == TRANSLATE_Y + 1
