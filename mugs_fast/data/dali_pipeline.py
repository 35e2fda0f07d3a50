"""The DALI graph of the multi-crop augmentation: decode each image once, cut its 4 + L crops.

The samples of the DALI batch are the crops: sample k * B + b is crop slot k (as in `mugs_fast.data.params`)
of image b, so every op runs once per batch over all crops it applies to, and the graph has the same ~140
operators for any number of local crops. (One DALI branch per crop slot and RandAugment kind made ~1,900
operators for 4 + 10 crops, each with its fixed per-batch cost.)

- Decode once: the samples of slot 0 decode their image's JPEG ('mixed' = nvJPEG and the hardware decoder on
  GPU, 'cpu' otherwise), the others skip the decoder (a conditional), and `permute_batch` then hands every
  crop its image's decoded pixels.
- RandAugment (`mugs_fast.data.randaugment`) on the full decoded image, for the strong crops only (the
  release's order: RandAugment before the crop): per layer, one branch per kind of op.
- Crop: a bicubic, antialiased resize of the crop's window (`fn.resize` with a pixel ROI: torchvision's
  RandomResizedCrop with the window from the plan; a mirrored ROI is the horizontal flip) to the slot's size;
  then the Gaussian blur of the weak crops whose plan says so.
- Out: uint8 HWC crops padded to the global size, (N, S, S, 3) with N = (4 + L) B (local crops in their
  top-left s x s corner), and each sample's batch tag. The rest of the weak ops (colour jitter, grayscale,
  solarize), random erasing, normalisation and the dtype are applied in torch on the device
  (`mugs_fast.data.finish`): one batched op per resolution, and DALI has no bf16.

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
  mirrored after it, and the geometric RandAugment ops of a flipped crop are mirrored to match
  (`randaugment._mirrored`): the same result op for op (the window's position is drawn unflipped, which
  leaves its distribution unchanged).
- RandAugment (`mugs_fast.data.randaugment`): levels N(9, 0.5) quantised to 0.1; bilinear warps where timm
  picks bilinear or bicubic; Equalize with OpenCV's formula (3-12 levels from PIL's on average); AutoContrast
  rounds where PIL truncates; Sharpness also filters the 1-px border.
- RandomErasing: timm's boxes and p, N(0, 1) noise on [0, 1] values before normalisation, as the release.
"""

import contextlib

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from mugs_fast.data.params import RA_LAYERS
from mugs_fast.data.randaugment import LAYER_FIELDS, ra_arguments, rand_augment

# per-sample arrays of the external source, in this order (one batch: a list of N JPEGs + (N, ...) arrays)
SOURCE_FIELDS = (
    "jpeg",  # the image's JPEG for slot 0's samples, empty for the others
    "owner",  # bool: decodes its JPEG (slot 0)
    "source",  # int32: the sample whose decoded image this crop uses (its image's slot-0 sample)
    "roi_start",  # (2,) float32 window y0, x0 in source pixels
    "roi_end",  # (2,) float32 window y1, x1 (x1 < x0: mirrored)
    "size",  # (2,) float32 crop height, width
    "blur",  # bool
    "sigma",  # float32 Gaussian sigma of the blur
    *(f"ra{layer}_{name}" for layer in range(RA_LAYERS) for name in LAYER_FIELDS),
    "tag",  # int64 batch number, to check that outputs come back in feed order
)
_NO_JPEG = np.empty(0, np.uint8)


def _resize_window(images, roi_start, roi_end, size):
    return fn.resize(
        images,
        roi_start=roi_start,
        roi_end=roi_end,
        roi_relative=False,
        size=size,
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )


def cut_window(images, roi, size: int):
    """The window roi (y0, x0, y1, x1 in pixels; per sample) of each image, resampled to size x size."""
    return _resize_window(images, roi[0:2], roi[2:4], [size, size])


def _decode_once(jpeg, owner, source, decoder: str, hw_decoder_load: float):
    """Every sample gets its image's decoded pixels; only the `owner` samples run the decoder."""
    if owner:
        decode_args = dict(hw_decoder_load=hw_decoder_load) if decoder == "mixed" else {}
        images = fn.decoders.image(jpeg, device=decoder, output_type=types.RGB, adjust_orientation=False, **decode_args)
    else:  # a 1-px stand-in, replaced by permute_batch below
        placeholder = np.zeros((1, 1, 3), np.uint8)
        images = types.Constant(placeholder, layout="HWC", device="gpu" if decoder == "mixed" else "cpu")
    return fn.permute_batch(images, indices=source)


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(source, global_size: int, decoder: str, hw_decoder_load: float = 0.75):
    """Outputs: crops (N, S, S, 3) uint8 (S = global_size; smaller crops padded), tags (N,) int64.

    source: callable returning one batch as the tuple SOURCE_FIELDS (see `source_batch`).
    decoder: 'mixed' (GPU) or 'cpu'.
    """
    fields = fn.external_source(source=source, num_outputs=len(SOURCE_FIELDS), batch=True, parallel=False)
    src = {name: fields[i] for i, name in enumerate(SOURCE_FIELDS)}  # no zip(strict=): autograph lacks it
    images = _decode_once(src["jpeg"], src["owner"], src["source"], decoder, hw_decoder_load)
    layers = [{name: src[f"ra{layer}_{name}"] for name in LAYER_FIELDS} for layer in range(RA_LAYERS)]
    crops = _resize_window(rand_augment(images, layers), src["roi_start"], src["roi_end"], src["size"])
    if src["blur"]:
        crops = fn.gaussian_blur(crops, sigma=src["sigma"])
    return fn.pad(crops, axis_names="HW", shape=[global_size, global_size]), src["tag"]


def build_pipeline(
    source,
    *,
    batch_size: int,
    crops_per_image: int,
    global_size: int,
    device: torch.device,
    num_threads: int,
    prefetch: int,
    hw_decoder_load: float,
):
    """The built graph for `device` (cuda: 'mixed' decoding and GPU ops; cpu: DALI's CPU-only mode).

    batch_size: images per batch; DALI's batch holds crops_per_image samples per image.
    """
    on_gpu = device.type == "cuda"
    with no_origin_tracing():
        pipe = multicrop_pipeline(
            source,
            global_size,
            "mixed" if on_gpu else "cpu",
            hw_decoder_load,
            batch_size=batch_size * crops_per_image,
            num_threads=num_threads,
            device_id=device.index if on_gpu else None,
            prefetch_queue_depth=prefetch,
            exec_dynamic=True,
        )
        pipe.build()
    return pipe


def drain(pipe) -> None:
    """Runs `pipe` to the end of what it was fed, dropping the outputs (and any decoding error among them: those
    batches are dropped anyway), then resets it, so that the next epoch starts clean."""
    while True:
        try:
            pipe.run()
        except StopIteration:
            break
        except RuntimeError:
            pass
    pipe.reset()


@contextlib.contextmanager
def no_origin_tracing():
    """DALI records a Python stack trace for every operator it defines: most of a graph's build time.

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
    """One external-source batch (SOURCE_FIELDS): sample k * B + b is crop slot k of image b.

    jpegs: the B images' JPEG bytes (uint8 arrays); shapes: their (B, 2) heights and widths; plan: the CropPlan.
    """
    num_crops, b = plan.strong.shape
    n = num_crops * b
    flat = lambda a: np.ascontiguousarray(a.reshape((n,) + a.shape[2:]))  # (K, B, ...) -> (N, ...)
    flipped = plan.roi[..., 1] > plan.roi[..., 3]
    layers = ra_arguments(plan.ra_op, plan.ra_bin, plan.ra_sign, shapes[:, 0], shapes[:, 1], flipped)
    fields = {
        "jpeg": list(jpegs) + [_NO_JPEG] * (n - b),
        "owner": np.arange(n) < b,
        "source": np.arange(n, dtype=np.int32) % b,
        "roi_start": flat(plan.roi[..., :2]),
        "roi_end": flat(plan.roi[..., 2:]),
        "size": np.repeat(plan.size, b).astype(np.float32)[:, None].repeat(2, 1),
        "blur": flat(plan.blur > 0),
        "sigma": flat(plan.blur),
        **{f"ra{i}_{name}": flat(a) for i, layer in enumerate(layers) for name, a in layer.items()},
        "tag": np.full(n, tag, np.int64),
    }
    return tuple(fields[name] for name in SOURCE_FIELDS)
