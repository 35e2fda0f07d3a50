"""mugs_fast.data.beton.BetonReader against ffcv's own reader and writer; truncated and foreign files."""

import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prep_testing import REPO

from data_prep.convert import convert
from data_prep.synth import write_dataset
from mugs_fast.data.beton import HEADER_DTYPE, BetonError, BetonReader

MAX_RES = 160


@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> Path:
    """A .beton of 3 classes x 12 synthetic images (104-200 px, some larger than MAX_RES and resized)."""
    root = tmp_path_factory.mktemp("beton")
    data = write_dataset(
        root / "synth", num_classes=3, train_per_class=12, val_per_class=0, min_size=104, max_size=200, workers=2
    )
    convert(data.train_dir, root / "train.beton", max_resolution=MAX_RES, workers=2, progress=False)
    return root / "train.beton"


@pytest.fixture(scope="module")
def ffcv_reader_cls():
    reader = pytest.importorskip("ffcv.reader")  # imports numba and torch: ~5-10 s, once for this module
    return reader.Reader


def ffcv_samples(ffcv_reader, path: Path) -> list[bytes]:
    """Each sample's JPEG bytes as ffcv lays them out: the allocation of the sample in its allocation table."""
    data = np.fromfile(path, dtype=np.uint8)
    table = ffcv_reader.alloc_table
    out = []
    for i in range(int(ffcv_reader.num_samples)):
        (row,) = table[table["sample_id"] == i]  # one allocation per sample: the image
        out.append(data[row["ptr"] : row["ptr"] + row["size"]].tobytes())
    return out


def test_reader_matches_ffcv_reader(beton, ffcv_reader_cls):
    ours, theirs = BetonReader(beton), ffcv_reader_cls(str(beton))
    assert len(ours) == theirs.num_samples == 36
    assert theirs.field_names == ["image", "label"]
    np.testing.assert_array_equal(ours.labels, theirs.metadata["f1"])
    np.testing.assert_array_equal(ours.heights, theirs.metadata["f0"]["height"])
    np.testing.assert_array_equal(ours.widths, theirs.metadata["f0"]["width"])
    assert (theirs.metadata["f0"]["mode"] == 0).all()  # 'jpg'
    for i, jpeg in enumerate(ffcv_samples(theirs, beton)):
        ours_jpeg, label = ours[i]
        assert ours_jpeg.tobytes() == jpeg and label == int(theirs.metadata["f1"][i])
        img = Image.open(io.BytesIO(jpeg))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (ours.widths[i], ours.heights[i]))
    assert max(ours.heights.max(), ours.widths.max()) == MAX_RES


def test_writer_matches_ffcv_writer(beton, ffcv_reader_cls, tmp_path):
    """ffcv's DatasetWriter with RGBImageField('jpg') on the same pixels writes the same JPEG bytes: the files
    differ only in the order of pages (ffcv's workers race for them), not in what a reader gets."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    ours = BetonReader(beton)
    small = [i for i in range(len(ours)) if max(ours.heights[i], ours.widths[i]) < MAX_RES]  # not resized
    dataset = [(np.asarray(Image.open(io.BytesIO(ours[i][0].tobytes()))), ours[i][1]) for i in small]
    # re-encoding the decoded JPEG is not idempotent, so compare two writers on the same decoded pixels
    ours_again_src = tmp_path / "src"
    for k, (pixels, label) in enumerate(dataset):
        (ours_again_src / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(ours_again_src / f"c{label}" / f"{k:03d}.png")
    convert(ours_again_src, tmp_path / "ours.beton", max_resolution=MAX_RES, workers=1, progress=False)

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=MAX_RES, jpeg_quality=90), "label": IntField()}
    DatasetWriter(str(tmp_path / "ffcv.beton"), fields, num_workers=1).from_indexed_dataset(dataset)
    mine, ffcvs = BetonReader(tmp_path / "ours.beton"), BetonReader(tmp_path / "ffcv.beton")
    assert len(mine) == len(ffcvs) == len(small) > 5
    for i in range(len(mine)):
        assert mine[i][0].tobytes() == ffcvs[i][0].tobytes()
        assert mine[i][1] == ffcvs[i][1]
    np.testing.assert_array_equal(mine.heights, ffcvs.heights)
    header = lambda p: np.fromfile(p, dtype=HEADER_DTYPE, count=1)[0]
    mine_h, ffcv_h = header(tmp_path / "ours.beton"), header(tmp_path / "ffcv.beton")
    assert [mine_h[k] for k in ("version", "num_fields", "page_size", "num_samples")] == [
        ffcv_h[k] for k in ("version", "num_fields", "page_size", "num_samples")
    ]


def test_zero_copy_views_and_arrays(beton):
    reader = BetonReader(beton)
    jpeg, label = reader[-1]
    assert type(jpeg) is np.ndarray and jpeg.dtype == np.uint8 and not jpeg.flags.writeable
    assert np.shares_memory(jpeg, reader[-1][0])  # a view into the map, not a copy
    assert jpeg[:3].tobytes() == b"\xff\xd8\xff" and jpeg[-2:].tobytes() == b"\xff\xd9"
    assert isinstance(label, int) and label == 2
    assert reader.sizes.dtype == np.int64 and (reader.sizes == [len(reader[i][0]) for i in range(len(reader))]).all()
    assert reader.classes == ["00_stripes", "01_checkers", "02_dots"] and reader.num_classes == 3
    with pytest.raises(IndexError):
        reader[len(reader)]


def test_pickles_as_its_path(beton):
    reader = BetonReader(beton)
    blob = pickle.dumps(reader)
    assert len(blob) < 500  # not the mapped file
    again = pickle.loads(blob)
    assert len(again) == len(reader) and again[7][0].tobytes() == reader[7][0].tobytes()


def test_without_class_list(beton, tmp_path):
    shutil.copy(beton, tmp_path / "bare.beton")
    reader = BetonReader(tmp_path / "bare.beton")
    assert reader.classes is None and reader.num_classes == 3


def truncations(beton: Path) -> dict[str, bytes]:
    data = beton.read_bytes()
    return {
        "empty": b"",
        "a few bytes": data[:10],
        "header only": data[: HEADER_DTYPE.itemsize],
        "half": data[: len(data) // 2],
        "last byte missing": data[:-1],
        "last allocation missing": data[:-24],
    }


@pytest.mark.parametrize(
    "case", ["empty", "a few bytes", "header only", "half", "last byte missing", "last allocation missing"]
)
def test_truncated_file_is_a_clear_error(beton, tmp_path, case):
    path = tmp_path / "cut.beton"
    path.write_bytes(truncations(beton)[case])
    with pytest.raises(BetonError) as err:
        BetonReader(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_foreign_files_are_a_clear_error(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.beton", "JPEG")
    (tmp_path / "text.beton").write_text("just some text that is long enough for a header" * 3)
    for name in ("photo.beton", "text.beton"):
        with pytest.raises(BetonError, match="not an ffcv .beton"):
            BetonReader(tmp_path / name)
    with pytest.raises(BetonError, match="cannot map"):
        BetonReader(tmp_path)  # a folder


def test_import_stays_light():
    code = "import sys, mugs_fast.data.beton; print(sorted({'ffcv', 'numba', 'cv2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
