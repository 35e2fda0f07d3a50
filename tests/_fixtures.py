"""Small .beton files for the data-pipeline tests: data_prep's synthetic images, written with its BetonWriter."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.synth import render
from data_prep.writer import BetonWriter
from mugs_fast.data.contract import CropSpec


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_beton(
    path: Path,
    num_samples: int,
    *,
    seed: int = 0,
    min_size: int = 40,
    max_size: int = 72,
    num_classes: int = 5,
    corrupt: dict[int, bytes] | None = None,
) -> Path:
    """num_samples synthetic JPEGs (sides in [min_size, max_size]); `corrupt` replaces some samples' bytes."""
    rng = np.random.default_rng(seed)
    with BetonWriter(path, num_samples, page_size=1 << 21) as writer:
        for i in range(num_samples):
            img = render(rng, i % num_classes, min_size, max_size)
            data = corrupt[i] if corrupt and i in corrupt else encode_jpeg(img)
            writer.add(data, img.shape[0], img.shape[1], i % num_classes)
        writer.finish()
    return path


def undefined_quant_table(jpeg: bytes) -> bytes:
    """The JPEG with its frame header pointing at a quantisation table that is not defined: markers, start,
    frame size and end are intact, so the loader's cheap header check passes it, but decoders refuse it."""
    sof = jpeg.index(b"\xff\xc0")
    data = bytearray(jpeg)
    data[sof + 12] = 3  # component 1's table selector Tq: tables 0 and 1 exist
    return bytes(data)


def _scan_middle(jpeg: bytes) -> int:
    """The offset halfway through the entropy-coded data of a baseline JPEG (after the scan header)."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    return (start + len(jpeg)) // 2


def overwritten_scan(jpeg: bytes, length: int = 32) -> bytes:
    """The JPEG with `length` bytes in the middle of its entropy-coded data zeroed: every marker, the frame size
    and the end are intact, so the header check passes it; decoders fill the damage in, libjpeg with a warning."""
    middle = _scan_middle(jpeg)
    assert middle + length < len(jpeg) - 2, "an image with more entropy-coded data is needed"
    return jpeg[:middle] + bytes(length) + jpeg[middle + length :]


def truncated_scan(jpeg: bytes) -> bytes:
    """The JPEG cut in the middle of its entropy-coded data, the end-of-image marker put back after the cut."""
    return jpeg[: _scan_middle(jpeg)] + b"\xff\xd9"


def small_crops(local_crops_number: int = 10) -> CropSpec:
    """The data-pipeline tests' crops: 32-px globals, 16-px locals."""
    return CropSpec(local_crops_number, global_size=32, local_size=16)


LOADER_ARGS = dict(crops=small_crops(), device="cpu", seed=7)


def run_epochs(loader, epochs) -> list[dict]:
    """All batches of these epochs, in order."""
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += list(loader)
    return out
