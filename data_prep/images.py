"""One source image -> the JPEG stored in the .beton: decode once, convert to RGB, downscale, re-encode.

This is the per-file work of a conversion and runs in worker processes, so it returns plain picklable values
and never raises for a bad file: it returns the reason instead.
"""

import io
import warnings
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

# leading bytes of common image formats: names the format of a file that PIL cannot even open
MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class Encoded(NamedTuple):
    jpeg: bytes
    height: int
    width: int
    source: str  # format and mode of the source when it was not an RGB JPEG ("PNG RGBA"), else ""


def target_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """The size after scaling the longer side down to max_resolution (ffcv's resizer: floor, never up)."""
    ratio = max_resolution / max(width, height)
    if ratio >= 1:
        return width, height
    return max(1, int(width * ratio)), max(1, int(height * ratio))


def encode_image(path: str, max_resolution: int, jpeg_quality: int) -> Encoded | str:
    """The image at `path` as an RGB JPEG whose longer side is at most max_resolution, or why it was skipped.

    A JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's draft
    mode: still >= the target size), which is several times faster than a full decode; the rest of the
    downscaling is Lanczos. Grayscale, palette, CMYK, RGBA, ... sources are converted to RGB; as with
    torchvision's ImageFolder loader, alpha is dropped and EXIF orientation is not applied.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"

    kind = "image"
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")  # EXIF and palette-transparency chatter; errors still raise
            kind = im.format or kind
            source = "" if (im.format, im.mode) == ("JPEG", "RGB") else f"{im.format} {im.mode}"
            size = target_size(im.width, im.height, max_resolution)
            if size != im.size:
                im.draft("RGB", size)
            rgb = im.convert("RGB")  # decodes: truncated or corrupt data raises here
    except UnidentifiedImageError:
        magic = next((name for m, name in MAGIC.items() if data.startswith(m)), None)
        return f"cannot decode {magic}: corrupt header" if magic else "not an image (unrecognised format)"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely: {e}"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        return f"cannot decode {kind}: {type(e).__name__}: {e}"

    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=jpeg_quality)
    return Encoded(out.getvalue(), rgb.height, rgb.width, source)
