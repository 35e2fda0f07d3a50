"""One source image -> the JPEG stored in the .beton: the original bytes where they can serve as they are,
else decoded once, converted to RGB, downscaled and re-encoded.

This is the per-file work of a conversion and runs in worker processes, so it returns plain picklable values
and never raises for a bad file: it returns the reason instead.
"""

import io
import warnings
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from mugs_fast.data.jpeg import BadJpeg, check_jpeg, jpeg_size

# leading bytes of common image formats: names the format of a file that PIL cannot even open
MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


# modes that PIL converts to RGB without losing the picture (alpha aside, see to_rgb)
_RGB_LIKE = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_WITH_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_HIGH_DEPTH = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})  # one channel, more than 8 bits


class UnsupportedMode(ValueError):
    """A decoded image whose pixel mode has no faithful 8-bit RGB conversion here."""


# frame types every decoder here reads (PIL, DALI on CPU and GPU, nvJPEG): baseline, extended, progressive
# Huffman. Arithmetic-coded, lossless and hierarchical JPEGs are re-encoded.
_PLAIN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
EXIF_ORIENTATION = 0x0112


class Encoded(NamedTuple):
    jpeg: bytes
    height: int
    width: int
    source: str  # format and mode of the source when it was not an RGB JPEG ("PNG RGBA"), else ""
    reencoded: str  # why the image was re-encoded ("larger than --max-resolution", ...); "" when stored as-is


def target_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """The size after scaling the longer side down to max_resolution (ffcv's resizer: floor, never up)."""
    ratio = max_resolution / max(width, height)
    if ratio >= 1:
        return width, height
    return max(1, int(width * ratio)), max(1, int(height * ratio))


def encode_image(
    source: str | bytes,
    max_resolution: int,
    jpeg_quality: int,
    reencode: bool = False,
    max_bytes: int | None = None,
) -> Encoded | str:
    """The image (a file path, or the file's bytes) as an RGB JPEG whose longer side is at most max_resolution,
    or why it was skipped.

    An RGB JPEG (baseline or progressive, no EXIF rotation) that fits max_resolution and max_bytes is stored
    byte for byte once it decodes cleanly (`check_jpeg`: every Huffman code read, libjpeg's warnings are
    errors), unless `reencode`. Any other image is decoded once: an RGB or grayscale JPEG by libjpeg-turbo,
    as strictly, scaled in the DCT domain to the smallest of its n/8 sizes that is still >= the target size
    (several times faster than a full decode for large images); the others by PIL, then `to_rgb`. The rest of
    the downscaling is Lanczos, then a JPEG at jpeg_quality.
    """
    data = _read(source)
    if isinstance(data, str):
        return data
    kind = "image"
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")  # EXIF and palette-transparency chatter; errors still raise
            kind = im.format or kind
            size = target_size(im.width, im.height, max_resolution)
            why = _why_not_as_is(im, data, size, max_bytes) or ("--reencode" if reencode else "")
            if not why:
                check_jpeg(np.frombuffer(data, np.uint8))
                return Encoded(data, im.height, im.width, "", "")
            source_kind = "" if (im.format, im.mode) == ("JPEG", "RGB") else f"{im.format} {im.mode}"
            if im.format == "JPEG" and im.mode in ("RGB", "L"):  # libjpeg finds damage that PIL passes over
                rgb = Image.fromarray(decode_jpeg(data, size))
            else:
                im.load()  # decodes: truncated or corrupt data raises here
                rgb = to_rgb(im)
    except UnidentifiedImageError:
        magic = next((name for m, name in MAGIC.items() if data.startswith(m)), None)
        return f"cannot decode {magic}: corrupt header" if magic else "not an image (unrecognised format)"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely: {e}"
    except BadJpeg as e:
        return f"cannot decode JPEG: {e}"
    except UnsupportedMode as e:
        return str(e)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        return f"cannot decode {kind}: {type(e).__name__}: {e}"

    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=jpeg_quality)
    if max_bytes is not None and out.tell() > max_bytes:
        return f"re-encoded JPEG of {out.tell():,} bytes does not fit a page of the .beton"
    return Encoded(out.getvalue(), rgb.height, rgb.width, source_kind, why)


def decode_jpeg(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The RGB pixels of a JPEG, (H, W, 3), decoded at the smallest n/8 scale that is at least `size` (w, h);
    raises BadJpeg for damaged data (libjpeg's warnings are errors)."""
    jpeg_size(np.frombuffer(data, np.uint8))  # a missing end: libjpeg would fill it in with grey
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1], strict=True)
    except ValueError as e:  # libjpeg's message, e.g. "Corrupt JPEG data: premature end of data segment"
        raise BadJpeg(str(e)) from None


def _read(source: str | bytes) -> bytes | str:
    """The bytes of the file at `source` (or `source` itself), or why they cannot be read."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
    return data if data else "empty file (0 bytes)"


def _why_not_as_is(im: Image.Image, data: bytes, size: tuple[int, int], max_bytes: int | None) -> str:
    """Why the source bytes cannot be stored as they are, "" when they can (an opened, not decoded, image)."""
    if im.format != "JPEG":
        return "not a JPEG"
    if im.mode != "RGB":
        return "not RGB"
    if size != im.size:
        return "larger than --max-resolution"
    if frame_type(data) not in _PLAIN_FRAMES:
        return "not baseline or progressive"
    if im.getexif().get(EXIF_ORIENTATION, 1) != 1:  # decoders that apply it would disagree on the size
        return "EXIF orientation"
    if max_bytes is not None and len(data) > max_bytes:
        return "larger than a page"
    return ""


def frame_type(data: bytes) -> int | None:
    """The start-of-frame marker of a JPEG (0xC0 baseline, 0xC2 progressive, ...), None if none is found."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in _SOF:
            return marker
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # no length field
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """The decoded `im` as 8-bit RGB, keeping its picture; raises UnsupportedMode for other pixel formats.

    PIL's plain convert("RGB") clips 16- and 32-bit values to 255 (a white image) and drops alpha, which
    blanks pictures drawn by their alpha channel (a black glyph on transparency). So: transparency is
    composited onto white, as a viewer shows it; 16-bit values are scaled by 255/65535; 32-bit integer and
    float images (no nominal range) are stretched from their minimum to their maximum.
    """
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _RGB_LIKE:
        return im.convert("RGB")
    if im.mode in _WITH_ALPHA:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in _HIGH_DEPTH:
        return Image.fromarray(_to_uint8(im)).convert("RGB")
    raise UnsupportedMode(f"unsupported pixel format: {im.format} {im.mode}")


def _to_uint8(im: Image.Image) -> np.ndarray:
    """A one-channel image of more than 8 bits as uint8: 16-bit by its nominal range, 32-bit by its own."""
    if im.mode.startswith("I;16"):
        x = np.asarray(im.convert("I"), dtype=np.float64)
        return np.rint(x * (255 / 65535)).astype(np.uint8)
    x = np.asarray(im, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if not finite.size:
        raise UnsupportedMode(f"{im.format} {im.mode} image without a finite value")
    low, high = finite.min(), finite.max()
    scaled = (np.nan_to_num(x, nan=low, posinf=high, neginf=low) - low) * (255 / max(high - low, 1e-12))
    return np.rint(scaled).clip(0, 255).astype(np.uint8)
