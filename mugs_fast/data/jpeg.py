"""Whether a JPEG decodes cleanly, before a decoder that would not say so sees it.

`jpeg_size`: a cheap look at the markers (a few microseconds): the size, or why the header or the end is broken.
`check_jpeg`: that, then a strict decode of the entropy-coded data, which alone finds damage inside it.
"""

import numpy as np
import simplejpeg

# start-of-frame markers (baseline, progressive, lossless, arithmetic...): C0-CF except DHT C4, JPG C8, DAC CC
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field
_SOS, _EOI = 0xDA, 0xD9
# bytes after the end-of-image marker that a valid file may carry (zero padding, vendor trailers)
TRAILING_BYTES = 4096


class BadJpeg(ValueError):
    """The bytes do not decode cleanly: no start marker, no frame header before the scan, cut short, or (found
    by `check_jpeg`) damaged entropy-coded data."""


def check_jpeg(data: np.ndarray, decode: bool = True) -> tuple[int, int]:
    """(height, width) of the JPEG in `data` (uint8 array) if it decodes cleanly; raises BadJpeg.

    The header check (`jpeg_size`), then, with `decode`, a decode by libjpeg-turbo (simplejpeg) with its
    warnings as errors: damage in the middle of the entropy-coded data leaves every marker intact, and DALI's
    CPU decoder and PIL decode it without an error (DALI prints libjpeg's warning on stderr, naming no sample);
    the GPU decoders are not relied on to do better. The decode is at 1/8 scale: it reads every Huffman code
    (what finds the damage) and skips most of the inverse DCT and colour work. About 1 ms for a 500-px image.
    """
    size = jpeg_size(data)
    if decode:
        try:
            simplejpeg.decode_jpeg(data, min_height=1, min_width=1, strict=True)
        except ValueError as e:  # libjpeg's message, e.g. "Corrupt JPEG data: premature end of data segment"
            raise BadJpeg(str(e)) from None
    return size


def jpeg_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) from the frame header of the JPEG in `data` (uint8 array); raises BadJpeg.

    Checks the start-of-image marker, walks the marker segments to the frame header and the start of the scan,
    and checks that an end-of-image marker follows the scan start within the last TRAILING_BYTES bytes (a
    truncated file has none: decoders may fill its missing part with grey instead of failing). Costs a few
    microseconds: damaged entropy-coded data in the middle is left to `check_jpeg`.
    """
    b = memoryview(data)
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        raise BadJpeg("no JPEG start-of-image marker")
    size, scan = _headers(b)
    # an end marker cannot occur inside entropy-coded data (0xFF there is followed by 0x00 or RSTn)
    tail_start = max(scan, n - TRAILING_BYTES)
    if bytes(b[tail_start:]).rfind(b"\xff\xd9") < 0:
        raise BadJpeg("no end-of-image marker after the scan (truncated?)")
    return size


def _headers(b: memoryview) -> tuple[tuple[int, int], int]:
    """((height, width) of the frame header, offset of the first start-of-scan marker)."""
    i, n, size = 2, len(b), None
    while i + 4 <= n:
        if b[i] != 0xFF:
            raise BadJpeg(f"bad marker at byte {i}")
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _STANDALONE:
            i += 2
        elif marker == _EOI or (marker == _SOS and size is None):
            raise BadJpeg("no frame header before the scan")
        elif marker == _SOS:
            return size, i
        elif marker in _SOF and size is None:
            if i + 9 > n:
                break
            size = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            if 0 in size:
                raise BadJpeg(f"frame header with size {size[0]}x{size[1]}")
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
        else:
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    raise BadJpeg("cut short before the scan" if size else "cut short before the frame header")
