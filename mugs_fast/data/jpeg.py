"""A cheap look at a JPEG's markers: its size, or why it cannot decode (before the decoder sees it)."""

import numpy as np

# start-of-frame markers (baseline, progressive, lossless, arithmetic...): C0-CF except DHT C4, JPG C8, DAC CC
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


class BadJpeg(ValueError):
    """The bytes are not a complete JPEG: no start marker, no frame header before the scan, or cut short."""


def jpeg_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) from the frame header of the JPEG in `data` (uint8 array); raises BadJpeg.

    Checks the start-of-image marker, walks the marker segments to the frame header and checks that the
    file ends with an end-of-image marker (a truncated file does not). Costs a few microseconds: corrupt
    entropy-coded data in the middle is left to the decoder.
    """
    b = memoryview(data)
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        raise BadJpeg("no JPEG start-of-image marker")
    if b[n - 2] != 0xFF or b[n - 1] != 0xD9:
        raise BadJpeg("no end-of-image marker (truncated?)")
    i = 2
    while i + 4 <= n:
        if b[i] != 0xFF:
            raise BadJpeg(f"bad marker at byte {i}")
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _STANDALONE:
            i += 2
        elif marker in (0xD9, 0xDA):
            raise BadJpeg("no frame header before the scan")
        elif marker in _SOF:
            if i + 9 > n:
                break
            height, width = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            if height == 0 or width == 0:
                raise BadJpeg(f"frame header with size {height}x{width}")
            return height, width
        else:
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    raise BadJpeg("cut short before the frame header")
