"""timm's RandAugment 'rand-m9-mstd0.5-inc1', as the Mugs release configures it, in DALI.

DALI's `auto_aug.rand_augment` differs from it: its op list (no Invert or SolarizeAdd, an extra Identity),
its magnitude scale (31 bins, one fixed magnitude), no per-op probability, and one branch per op. Here the
timm ops are grouped into six kinds; each RandAugment layer is one DALI branch per kind, run over every crop
of the batch at once (the crops are the samples of the DALI batch, see `dali_pipeline`), with per-sample
arguments that the host computes from the plan (`ra_arguments`).

    index  timm op                argument at level v (v in [0, 10]; +- = random sign)     kind
    0      AutoContrast           -                                                        autocontrast
    1      Equalize               -    (DALI's formula is OpenCV's; PIL's differs slightly) equalize
    2      Invert                 -                                                        lut
    3      Rotate                 +- 3 v degrees about the centre                          geometric
    4      PosterizeIncreasing    keep 4 - int(0.4 v) bits                                 lut
    5      SolarizeIncreasing     invert pixels >= 256 - int(25.6 v)                       lut
    6      SolarizeAdd            + int(11 v) to pixels < 128                              lut
    7      ColorIncreasing        blend with luma, factor f = max(0.1, 1 +- 0.09 v)        affine
    8      ContrastIncreasing     blend with the mean luma, factor f                       affine
    9      BrightnessIncreasing   scale by f                                               affine
    10     SharpnessIncreasing    blend with PIL's SMOOTH filter, factor f                 sharpness
    11,12  ShearX/Y               +- 0.03 v                                                geometric
    13,14  TranslateX/YRel        +- 0.045 v x width / height                              geometric
    15     -: the layer's op was not applied (each op applies with p = 0.5)

The lut kind is one lookup in a table holding every uint8 map those four ops make at the quantised levels
(`LUT_TABLES`: 206 tables of 256 entries): a sample picks its table by an offset added to its
pixels. The affine kind rounds to uint8 where PIL does; AutoContrast rounds where PIL truncates; Sharpness also
filters the 1-px border (PIL keeps it). Geometric ops use PIL's inverse affine maps (same geometry), bilinear
(timm picks bilinear or bicubic at random), filling with the release's colour (124, 116, 104) (DALI only fills
with a scalar, so the image is shifted by the fill colour around the warp). The crop of a flipped slot is cut
with a mirrored window after RandAugment, where the release flips the image before it: such a slot gets the
mirror image of the drawn map (M' = F M F, F the flip), which makes the two orders equal op for op. Levels are
quantised to 0.1.
"""

import numpy as np
from nvidia.dali import fn, math, types

from mugs_fast.data.params import LEVEL_BINS, RA_FILL, RA_IDENTITY

AUTOCONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, SOLARIZE, SOLARIZE_ADD = range(7)
COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = range(7, 15)
KIND_OPS = {
    "affine": (COLOR, CONTRAST, BRIGHTNESS),
    "lut": (INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD),
    "autocontrast": (AUTOCONTRAST,),
    "sharpness": (SHARPNESS,),
    "equalize": (EQUALIZE,),
    "geometric": (ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y),
}
# per-sample fields of one layer: a bool per kind (is the layer's op of that kind), then the kinds' arguments
LAYER_FIELDS = (*KIND_OPS, "alpha", "beta", "gamma", "lut_offset", "kernel", "matrix")
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13  # PIL's ImageFilter.SMOOTH


def _lut_table(op: int, level: float) -> np.ndarray:
    """timm's (PIL's) uint8 map of a lut-kind op at `level`, as a (256,) table."""
    x = np.arange(256)
    if op == INVERT:
        return 255 - x
    if op == POSTERIZE:
        bits = 4 - int(np.floor((level / 10.0) * 4))
        return x & (256 - 2 ** (8 - bits))  # keep the top `bits` bits (0 bits: black, as the release)
    if op == SOLARIZE:
        return np.where(x < 256 - np.floor((level / 10.0) * 256), x, 255 - x)
    return np.where(x < 128, np.minimum(255, x + np.floor((level / 10.0) * 110)), x)  # SOLARIZE_ADD


def _lut_tables() -> tuple[np.ndarray, np.ndarray]:
    """Distinct tables (T, 256) uint8 (table 0: identity) and the table of each (op, level bin) (16, LEVEL_BINS)."""
    tables = {np.arange(256, dtype=np.uint8).tobytes(): 0}
    index = np.zeros((RA_IDENTITY + 1, LEVEL_BINS), np.int64)
    for op in KIND_OPS["lut"]:
        for level_bin in range(LEVEL_BINS):
            table = _lut_table(op, level_bin / 10.0).astype(np.uint8).tobytes()
            index[op, level_bin] = tables.setdefault(table, len(tables))
    return np.frombuffer(b"".join(tables), np.uint8).reshape(-1, 256), index


LUT_TABLES, _LUT_INDEX = _lut_tables()


def ra_arguments(op, level_bin, sign, heights, widths, flipped) -> list[dict[str, np.ndarray]]:
    """The DALI arguments of the RandAugment layers from the plan's choices.

    op, level_bin, sign: (..., RA_LAYERS) int arrays; heights, widths, flipped (the slot's crop is mirrored):
    broadcastable to (...). Returns one dict per layer, LAYER_FIELDS -> array (...) + field shape: the kind
    flags (bool), alpha, beta, gamma (float32), lut_offset (uint16), kernel (3, 3) and matrix (2, 3) (float32,
    destination to source, PIL's convention).
    """
    level = level_bin / 10.0
    signed = np.where(sign == 1, -level, level)
    factor = np.maximum(0.1, 1.0 + (signed / 10.0) * 0.9)
    is_op = lambda *ops: np.isin(np.arange(RA_IDENTITY + 1), ops)[op]  # a 16-entry table, then a gather
    heights, widths, flipped = (np.asarray(a)[..., None] for a in (heights, widths, flipped))

    kernel = np.where(is_op(SHARPNESS)[..., None, None], 1.0 - factor[..., None, None], 0.0) * _SMOOTH
    kernel[..., 1, 1] += np.where(is_op(SHARPNESS), factor, 1.0)
    matrix = _mirrored(_affine(op, signed, heights.astype(float), widths.astype(float)), widths, flipped)
    fields = {kind: is_op(*ops) for kind, ops in KIND_OPS.items()}
    fields |= {
        "alpha": np.where(is_op(COLOR, CONTRAST, BRIGHTNESS), factor, 1.0).astype(np.float32),
        "beta": np.where(is_op(COLOR), 1.0 - factor, 0.0).astype(np.float32),
        "gamma": np.where(is_op(CONTRAST), 1.0 - factor, 0.0).astype(np.float32),
        "lut_offset": (256 * _LUT_INDEX[op, level_bin]).astype(np.uint16),
        "kernel": kernel.astype(np.float32),
        "matrix": matrix.reshape(op.shape + (2, 3)).astype(np.float32),
    }
    layer_axis = op.ndim - 1
    return [{name: np.take(a, layer, axis=layer_axis) for name, a in fields.items()} for layer in range(op.shape[-1])]


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


def _mirrored(m, widths, flipped) -> np.ndarray:
    """F m F where flipped (F: x -> W - x): the map seen through a horizontal flip, e.g. ShearY(s) about the
    top-left -> (1, 0, 0, -s, 1, s W), Rotate(a) -> Rotate(-a)."""
    a, b, c, d, e, f = np.moveaxis(m, -1, 0)
    mirror = np.stack([a, -b, widths * (1 - a) - c, -d, e, d * widths + f], -1)
    return np.where(flipped[..., None], mirror, m)


def _affine_colour(x, alpha, beta, gamma):
    """Color, Contrast, Brightness: alpha x + beta luma + gamma mean(luma), rounded to uint8 (per-sample scalars)."""
    luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)  # PIL's 'L'
    return fn.cast(alpha * x + beta * luma + gamma * fn.reductions.mean(luma), dtype=types.UINT8)  # rounds, clips


def _lookup(x, offset):
    """Invert, Posterize, Solarize, SolarizeAdd: the sample's table of LUT_TABLES, chosen by its offset."""
    keys = x + offset  # uint8 + uint16 -> uint16: 256 * table + value
    return fn.lookup_table(
        keys, keys=list(range(LUT_TABLES.size)), values=LUT_TABLES.ravel().tolist(), dtype=types.UINT8
    )


def _autocontrast(x):
    """PIL's autocontrast (no cutoff): each channel stretched to 0..255, a constant channel kept."""
    lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
    spread = fn.reductions.max(x, axis_names="HW", keep_dims=True) - lo
    stretched = (x - lo) * (255.0 / math.max(spread, types.Constant(1, types.UINT8))) + lo * (spread == 0)
    return fn.cast(stretched, dtype=types.UINT8)


def _warp(x, matrix):
    fill = types.Constant(np.array(RA_FILL, np.float32), device=x.device)  # GPU arithmetic: a GPU constant
    return fn.cast(fn.warp_affine(x - fill, matrix=matrix, fill_value=0.0) + fill, dtype=types.UINT8)


def rand_augment(images, layers: list[dict]):
    """Applies RandAugment to a uint8 HWC batch: `layers` holds, per layer, the LAYER_FIELDS of every sample
    (DataNodes on the CPU, from `ra_arguments`). Each sample runs only the branch of its op's kind."""
    on_device = (lambda node: node.gpu()) if images.device == "gpu" else (lambda node: node)
    for args in layers:
        if args["affine"]:
            images = _affine_colour(images, args["alpha"], args["beta"], args["gamma"])
        if args["lut"]:
            images = _lookup(images, args["lut_offset"])
        if args["autocontrast"]:
            images = _autocontrast(images)
        if args["sharpness"]:
            images = fn.filter(images, on_device(args["kernel"]), border="clamp")
        if args["equalize"]:
            images = fn.equalize(images)
        if args["geometric"]:
            images = _warp(images, args["matrix"])
    return images


assert RA_IDENTITY == TRANSLATE_Y + 1
assert LUT_TABLES.size <= 1 << 16  # lookup_table's keys are at most 65535
