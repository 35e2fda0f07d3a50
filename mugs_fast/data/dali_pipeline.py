"""The DALI graph of the multi-crop augmentation: decode each image once, cut its 4 + L crops.

Per image (crop slots as in `mugs_fast.data.params`): the JPEG is decoded once ('mixed' = nvJPEG and the
hardware decoder on GPU, 'cpu' otherwise); every crop is a bicubic, antialiased resize of a window of it
(`fn.resize` with a pixel ROI: torchvision's RandomResizedCrop with the window from the plan; a flipped ROI
is the horizontal flip). A weak crop is then blurred when its plan says so. A strong crop first runs
RandAugment on the full decoded image (the release's order: RandAugment before the crop), then is cut.
Crops leave the graph as uint8 HWC, stacked per resolution: (4, S, S, 3) and (L, s, s, 3) per image; the
rest of the weak ops (colour jitter, grayscale, solarize), random erasing, normalisation and the dtype are
applied in torch on the device (`mugs_fast.data.finish`): one batched op per resolution, and DALI has no bf16.

All randomness comes from the host plan fed through `fn.external_source`, nothing from DALI's RNG: the
distributions are the release's, the random numbers are not (numpy per batch; torch's for the erasing noise).

Deviations from the release's PIL/torchvision pipeline (all small; tests/test_randaugment.py compares every
RandAugment op with timm's, tests/test_reference_pipeline.py the crop statistics of the two pipelines):
- Decoding: DALI (libjpeg-turbo on CPU, nvJPEG on GPU) vs PIL; nvJPEG may differ by a level or two.
- Resize: DALI's cubic resampling with antialiasing vs PIL's bicubic reduce; the window is the same.
- ColorJitter: torchvision applies brightness, contrast, saturation and hue in a random order, on uint8
  (clamped after each op), with hue shifted in HSV. Here they are one affine map per crop in float, clamped
  once, with hue a rotation of YIQ chroma (as DALI's and most GPU implementations do). Brightness, contrast
  (around the mean luma, as torchvision), saturation and grayscale commute exactly, so the random order only
  matters through the clamping.
- Gaussian blur: DALI's separable Gaussian (window 2*ceil(3 sigma)+1) vs PIL's extended box blur; blur runs
  before the colour jitter here, after it in the release (they commute up to uint8 rounding and clamping).
- Solarize (weak-2): on the float values after the jitter with threshold 127.5/255; PIL rounds to uint8 first.
- Flip: the release flips the full image before RandAugment for strong crops; here the crop window is
  mirrored. Every op of the suite is mirror-symmetric in distribution (signs are random), so the output
  distribution is the same.
- RandAugment (`mugs_fast.data.randaugment`): levels N(9, 0.5) quantised to 0.1; bilinear warps where timm
  picks bilinear or bicubic; Equalize with OpenCV's formula (3-12 levels from PIL's on average); AutoContrast
  rounds where PIL truncates; Sharpness also filters the 1-px border.
- RandomErasing: timm's boxes and p, N(0, 1) noise on [0, 1] values before normalisation, as the release.
"""

import contextlib

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from mugs_fast.data.randaugment import ra_arguments, rand_augment

# per-sample arrays of the external source, in this order (one batch: a list of JPEGs + (B, ...) arrays)
SOURCE_FIELDS = ("jpeg", "roi", "strong", "blur", "ra_colour", "ra_kernel", "ra_matrix", "ra_kinds", "tag")


def _cut(images, roi, size):
    return fn.resize(
        images,
        roi_start=roi[0:2],
        roi_end=roi[2:4],
        roi_relative=False,
        size=[size, size],
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )


def _weak(images, roi, sigma, size):
    out = _cut(images, roi, size)
    if sigma > 0:
        out = fn.gaussian_blur(out, sigma=sigma)
    return out


def _crop(images, k, size, src, strong_capable):
    """Crop slot k of every image: weak (cut, maybe blur) or, where the plan says strong, RandAugment + cut."""
    roi, sigma = src["roi"][k], src["blur"][k]
    if not strong_capable:
        return _weak(images, roi, sigma, size)
    if src["strong"][k]:
        augmented = rand_augment(images, *(src[f"ra_{name}"][k] for name in ("colour", "kernel", "matrix", "kinds")))
        out = _cut(augmented, roi, size)
    else:
        out = _weak(images, roi, sigma, size)
    return out


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(
    source, local_crops_number: int, global_size: int, local_size: int, decoder: str, hw_decoder_load: float = 0.75
):
    """Outputs per image: global crops (4, S, S, 3) uint8, local crops (L, s, s, 3) uint8 (when L > 0), tag.

    source: callable returning one batch as the tuple SOURCE_FIELDS (see `MultiCropLoader._feed`).
    decoder: 'mixed' (GPU) or 'cpu'.
    """
    fields = fn.external_source(source=source, num_outputs=len(SOURCE_FIELDS), batch=True, parallel=False)
    src = {name: fields[i] for i, name in enumerate(SOURCE_FIELDS)}  # no zip(strict=): autograph lacks it
    decode_args = dict(hw_decoder_load=hw_decoder_load) if decoder == "mixed" else {}
    images = fn.decoders.image(
        src["jpeg"], device=decoder, output_type=types.RGB, adjust_orientation=False, **decode_args
    )
    crops = [_crop(images, k, global_size if k < 4 else local_size, src, k >= 2) for k in range(4 + local_crops_number)]
    outputs = [fn.stack(*crops[:4])]
    if local_crops_number:
        outputs.append(fn.stack(*crops[4:]))
    return (*outputs, src["tag"])


def build_pipeline(
    source,
    *,
    batch_size: int,
    local_crops_number: int,
    global_size: int,
    local_size: int,
    device: torch.device,
    num_threads: int,
    prefetch: int,
    hw_decoder_load: float,
):
    """The built graph for `device` (cuda: 'mixed' decoding and GPU ops; cpu: DALI's CPU-only mode)."""
    on_gpu = device.type == "cuda"
    with _no_origin_tracing():
        pipe = multicrop_pipeline(
            source,
            local_crops_number,
            global_size,
            local_size,
            "mixed" if on_gpu else "cpu",
            hw_decoder_load,
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device.index if on_gpu else None,
            prefetch_queue_depth=prefetch,
            exec_dynamic=True,
        )
        pipe.build()
    return pipe


@contextlib.contextmanager
def _no_origin_tracing():
    """DALI records a Python stack trace for every operator it defines: ~75% of this graph's build time.

    The switch is private DALI API: without it the build is slower, never wrong.
    """
    try:
        from nvidia.dali._utils import dali_trace

        enabled = dali_trace.is_tracing_enabled()
        dali_trace.set_tracing(enabled=False)
    except (ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        dali_trace.set_tracing(enabled=enabled)


def source_batch(jpegs: list, shapes: np.ndarray, plan, tag: int) -> tuple:
    """One external-source batch (SOURCE_FIELDS) from the JPEGs, their (B, 2) heights and widths, the CropPlan."""
    per_sample = lambda a: np.ascontiguousarray(np.moveaxis(a, 0, 1))  # (K, B, ...) -> (B, K, ...)
    ra = ra_arguments(plan.ra_op, plan.ra_bin, plan.ra_sign, shapes[:, 0], shapes[:, 1])
    return (
        jpegs,
        per_sample(plan.roi),
        per_sample(plan.strong),
        per_sample(plan.blur),
        *(per_sample(ra[name]) for name in ("colour", "kernel", "matrix", "kinds")),
        np.full(len(jpegs), tag, np.int64),
    )
