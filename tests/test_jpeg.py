"""The loader's cheap JPEG header check: sizes of valid files, reasons for broken ones."""

import numpy as np
import pytest
from _fixtures import encode_jpeg

from data_prep.synth import render
from mugs_fast.data.jpeg import TRAILING_BYTES, BadJpeg, jpeg_size


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode_jpeg(render(np.random.default_rng(0), 0, 37, 53))


def check(data: bytes) -> tuple[int, int]:
    return jpeg_size(np.frombuffer(data, np.uint8))


def test_size_of_a_valid_jpeg(jpeg):
    img = render(np.random.default_rng(0), 0, 37, 53)
    assert check(jpeg) == img.shape[:2]


@pytest.mark.parametrize("trailer", [b"\x00", b"\x00" * 301, b"EXIF trailer of some camera", b"\xff\xd8\x00\x10"])
def test_bytes_after_the_end_marker_are_accepted(jpeg, trailer):
    assert check(jpeg + trailer) == check(jpeg)


@pytest.mark.parametrize(
    "cut, message",
    [
        (lambda j: b"not a jpeg at all", "no JPEG start-of-image marker"),
        (lambda j: j[:-1], "no end-of-image marker"),
        (lambda j: j[: len(j) // 2], "no end-of-image marker"),
        (lambda j: j[: len(j) // 2] + b"\x00" * 50, "no end-of-image marker"),  # truncated, then padded
        (lambda j: j + b"\x00" * (TRAILING_BYTES + 1), "no end-of-image marker"),  # not looked for that far
        (lambda j: j[:20], "cut short"),
        (lambda j: j[:2] + b"\xff\xda\x00\x02" + j[2:], "no frame header before the scan"),
        (lambda j: j[:2] + b"\x12\x34" + j[2:], "bad marker at byte 2"),
    ],
)
def test_broken_jpegs_are_refused(jpeg, cut, message):
    with pytest.raises(BadJpeg, match=message):
        check(cut(jpeg))


def test_frame_header_with_zero_size(jpeg):
    sof = jpeg.index(b"\xff\xc0")
    data = bytearray(jpeg)
    data[sof + 5 : sof + 7] = b"\x00\x00"  # height 0
    with pytest.raises(BadJpeg, match="frame header with size 0x"):
        check(bytes(data))
