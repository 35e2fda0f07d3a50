"""The loaders' JPEG checks: sizes of valid files, reasons for broken ones (header check, strict decode)."""

import numpy as np
import pytest
from _fixtures import encode_jpeg, overwritten_scan, truncated_scan, undefined_quant_table

from data_prep.synth import render
from mugs_fast.data.jpeg import TRAILING_BYTES, BadJpeg, check_jpeg, jpeg_size


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


@pytest.mark.parametrize("trailer", [b"", b"\x00" * 7 + b"vendor trailer"])
def test_strict_decode_accepts_a_valid_jpeg(jpeg, trailer):
    assert check_jpeg(np.frombuffer(jpeg + trailer, np.uint8)) == check(jpeg)


@pytest.mark.parametrize(
    "damage, message",
    [
        (overwritten_scan, "Corrupt JPEG data: .* extraneous bytes"),
        (truncated_scan, "Corrupt JPEG data: premature end of data segment"),
        (undefined_quant_table, "Quantization table 0x03 was not defined"),
    ],
)
def test_damage_behind_intact_markers_fails_the_strict_decode_only(jpeg, damage, message):
    data = np.frombuffer(damage(jpeg), np.uint8)
    assert jpeg_size(data) == check_jpeg(data, decode=False) == check(jpeg)  # the header check passes it
    with pytest.raises(BadJpeg, match=message):
        check_jpeg(data)


def test_strict_decode_runs_after_the_header_check(jpeg):
    with pytest.raises(BadJpeg, match="no end-of-image marker"):
        check_jpeg(np.frombuffer(jpeg[:-1], np.uint8))
