"""data_prep.images: every source keeps its picture as 8-bit RGB (16/32-bit, float, alpha, palette, CMYK)."""

import io
from pathlib import Path

import numpy as np
import pytest
from _fixtures import overwritten_scan
from PIL import Image

from data_prep.images import EXIF_ORIENTATION, encode_image, frame_type

W, H = 64, 48
RAMP = np.broadcast_to(np.linspace(0.0, 1.0, W), (H, W))  # left black, right white


def _alpha_drawn(mode: str) -> Image.Image:
    """A black image whose picture is all in the alpha channel: a ramp from transparent to opaque black."""
    alpha = np.rint(RAMP * 255).astype(np.uint8)
    black = np.zeros((H, W), np.uint8)
    if mode == "LA":
        return Image.fromarray(np.stack([black, alpha], -1), "LA")
    return Image.fromarray(np.stack([black, black, black, alpha], -1), "RGBA")


def _palette_with_transparency() -> Image.Image:
    im = Image.fromarray(np.rint(RAMP * 255).astype(np.uint8)).convert("P")
    im.info["transparency"] = im.getpixel((0, 0))  # the black end is transparent: white after compositing
    return im


# name -> (image, format, expected grey level 0..1 per pixel)
SOURCES = {
    "PNG I;16": (lambda: Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)), "PNG", RAMP),
    "TIFF I;16": (lambda: Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)), "TIFF", RAMP),
    "TIFF I (32-bit)": (lambda: Image.fromarray(np.rint(RAMP * 4000 + 100).astype(np.int32)), "TIFF", RAMP),
    "TIFF F in 0..1": (lambda: Image.fromarray(RAMP.astype(np.float32)), "TIFF", RAMP),
    "TIFF F in -3..5": (lambda: Image.fromarray((RAMP * 8 - 3).astype(np.float32)), "TIFF", RAMP),
    "PNG LA drawn by alpha": (lambda: _alpha_drawn("LA"), "PNG", 1 - RAMP),
    "PNG RGBA drawn by alpha": (lambda: _alpha_drawn("RGBA"), "PNG", 1 - RAMP),
    "PNG P with transparency": (_palette_with_transparency, "PNG", np.where(RAMP == 0, 1.0, RAMP)),
    "TIFF CMYK": (lambda: Image.fromarray(np.rint(RAMP * 255).astype(np.uint8)).convert("CMYK"), "TIFF", RAMP),
    "PNG 1": (lambda: Image.fromarray(RAMP >= 0.5), "PNG", (RAMP >= 0.5).astype(float)),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_keeps_its_picture(name: str, tmp_path: Path):
    make, fmt, expected = SOURCES[name]
    path = tmp_path / f"source.{fmt.lower()}"
    make().save(path, fmt)
    result = encode_image(str(path), max_resolution=512, jpeg_quality=95)
    assert not isinstance(result, str), result
    assert result.source.startswith(fmt)  # reported as converted, with its format and mode
    got = np.asarray(Image.open(io.BytesIO(result.jpeg)).convert("RGB"), np.float64) / 255
    assert got.shape == (H, W, 3)
    assert np.abs(got - expected[..., None]).mean() < 0.03, name  # the ramp, not a blank image


def test_large_sixteen_bit_image_is_downscaled(tmp_path: Path):
    path = tmp_path / "big.png"
    Image.fromarray(np.rint(np.broadcast_to(np.linspace(0, 65535, 400), (300, 400))).astype(np.uint16)).save(path)
    result = encode_image(str(path), max_resolution=100, jpeg_quality=95)
    assert (result.width, result.height) == (100, 75)
    got = np.asarray(Image.open(io.BytesIO(result.jpeg)).convert("L"), np.float64)
    assert got[:, :10].mean() < 20 and got[:, -10:].mean() > 235


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kwargs)
    return out.getvalue()


def test_fitting_rgb_jpeg_is_kept_unless_something_needs_a_re_encode():
    img = Image.fromarray(np.rint(np.stack([RAMP, 1 - RAMP, RAMP], -1) * 255).astype(np.uint8))
    baseline, progressive = _jpeg_bytes(img), _jpeg_bytes(img, progressive=True)
    assert (frame_type(baseline), frame_type(progressive), frame_type(b"\xff\xd8 no markers")) == (0xC0, 0xC2, None)
    for data in (baseline, progressive):
        kept = encode_image(data, max_resolution=W, jpeg_quality=90)
        assert (kept.jpeg, kept.width, kept.height, kept.source, kept.reencoded) == (data, W, H, "", "")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # decoders that apply it would turn the picture and swap its sides
    reasons = {
        "EXIF orientation": encode_image(_jpeg_bytes(img, exif=exif), W, 90),
        "larger than --max-resolution": encode_image(baseline, W - 1, 90),
        "--reencode": encode_image(baseline, W, 90, reencode=True),
        "larger than a page": encode_image(baseline, W, 50, max_bytes=len(baseline) - 1),  # q50 fits
    }
    for reason, result in reasons.items():
        assert result.reencoded == reason and result.jpeg != baseline


def test_damaged_entropy_data_is_skipped_not_stored():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    damaged = overwritten_scan(_jpeg_bytes(noise))
    for max_resolution in (W, W // 2):  # kept as-is after the check, or re-encoded
        assert encode_image(damaged, max_resolution, 90).startswith("cannot decode JPEG: Corrupt JPEG data")
