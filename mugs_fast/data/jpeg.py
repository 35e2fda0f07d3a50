"""A cheap look at a JPEG's markers: its size, or why it cannot decode (before the decoder sees it)."""

import numpy as np

# start-of-frame markers (baseline, progressive, lossless, arithmetic...): C0-CF except DHT C4, JPG C8, DAC CC
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field
_SOS, _EOI = 0xDA, 0xD9
# bytes after the end-of-image marker that a valid file may carry (zero padding, vendor trailers)
TRAILING_BYTES = 4096


class BadJpeg(ValueError):
    """The bytes are not a complete JPEG: no start marker, no frame header before the scan, or cut short."""


def jpeg_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) from the frame header of the JPEG in `data` (uint8 array); raises BadJpeg.

    Checks the start-of-image marker, walks the marker segments to the frame header and the start of the scan,
    and checks that an end-of-image marker follows the scan start within the last TRAILING_BYTES bytes (a
    truncated file has none: decoders may fill its missing part with grey instead of failing). Costs a few
    microseconds: corrupt entropy-coded data in the middle is left to the decoder.
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
