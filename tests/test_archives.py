"""data_prep.convert on ImageNet's archives: a tar of class tars (train), a flat tar with labels (val)."""

import io
import json
import os
import signal
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prep_testing import assert_nothing_left, assert_one_line_error, run_prep, smooth_image, start_conversion

from data_prep.convert import convert
from data_prep.labels import LabelsError
from mugs_fast.data.beton import BetonReader

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92, **kwargs)
    return out.getvalue()


def _class_images(rng: np.random.Generator, synset: str) -> dict[str, bytes]:
    """One class's files: fitting RGB JPEGs (baseline and progressive) and the images that get re-encoded."""
    small = smooth_image(rng, 90, 70)
    files = {
        f"{synset}_10.JPEG": _jpeg(small),
        f"{synset}_11.JPEG": _jpeg(smooth_image(rng, 64, 100), progressive=True),
        f"{synset}_12.JPEG": _jpeg(smooth_image(rng, 300, 200)),  # larger than --max-resolution 128
        f"{synset}_13.JPEG": _jpeg(small.convert("CMYK")),
        f"{synset}_14.JPEG": _jpeg(small.convert("L")),
    }
    png = io.BytesIO()
    small.save(png, "PNG")
    files[f"{synset}_15.JPEG"] = png.getvalue()  # a PNG under a JPEG name
    return files


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict[str, bytes], order: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in order:
            _add(tar, name, files[name])
    return out.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """A miniature ILSVRC2012 download: train tar of class tars (members out of order), the same images
    extracted, a flat val tar, its labels as devkit-style, Kaggle CSV and plain files."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    classes = {synset: _class_images(rng, synset) for synset in SYNSETS}
    classes[SYNSETS[1]][f"{SYNSETS[1]}_16.JPEG"] = classes[SYNSETS[1]][f"{SYNSETS[1]}_10.JPEG"][:700]  # truncated
    classes[SYNSETS[2]][f"{SYNSETS[2]}_17.JPEG"] = b"not an image\n"
    inner = {f"{s}.tar": _tar_bytes(files, sorted(files, reverse=True)) for s, files in classes.items()}
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(inner, [f"{s}.tar" for s in SYNSETS[::-1]]))
    for synset, files in classes.items():
        (root / "train" / synset).mkdir(parents=True)
        for name, data in files.items():
            (root / "train" / synset / name).write_bytes(data)

    val, truth = {}, {}
    for i in range(1, 10):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        val[name] = _jpeg(smooth_image(rng, 80, 60))
        truth[name] = SYNSETS[i % 3]
    truth["ILSVRC2012_val_00000009.JPEG"] = "n09999999"  # a synset that train does not have
    del truth["ILSVRC2012_val_00000008.JPEG"]  # no label
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val, sorted(val)))
    (root / "val_flat").mkdir()
    for name, data in val.items():
        (root / "val_flat" / name).write_bytes(data)
    rows = [f"{Path(n).stem},{s} 1 2 30 40 {s} 5 6 70 80" for n, s in sorted(truth.items())]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    (root / "val_labels.txt").write_text("".join(f"{n} {s}\n" for n, s in sorted(truth.items())))
    return root


def _convert(src: Path, dst: Path, **options):
    return convert(src, dst, max_resolution=128, workers=2, progress=False, **options)


def _report(dst: Path) -> dict:
    return json.loads(dst.with_name(dst.name + ".report.json").read_text())


def test_train_archive_equals_the_extracted_folder(imagenet, tmp_path):
    from_tar = _convert(imagenet / "ILSVRC2012_img_train.tar", tmp_path / "tar.beton")
    from_folder = _convert(imagenet / "train", tmp_path / "folder.beton")
    assert (tmp_path / "tar.beton").read_bytes() == (tmp_path / "folder.beton").read_bytes()
    reader = BetonReader(tmp_path / "tar.beton")
    assert reader.classes == SYNSETS == BetonReader(tmp_path / "folder.beton").classes
    assert from_tar.written == from_folder.written == 3 * 6  # every class's 6 images, the two bad files skipped
    assert from_tar.stored_as_is == 6 and from_tar.reencoded == from_folder.reencoded
    assert from_tar.reencoded == {"not RGB": 6, "larger than --max-resolution": 3, "not a JPEG": 3}

    reasons = {item["path"]: item["reason"] for item in _report(tmp_path / "tar.beton")["skipped_files"]}
    assert reasons == {
        f"{SYNSETS[1]}.tar/{SYNSETS[1]}_16.JPEG": "cannot decode JPEG: no end-of-image marker after the scan "
        "(truncated?)",
        f"{SYNSETS[2]}.tar/{SYNSETS[2]}_17.JPEG": "not an image (unrecognised format)",
    }


def test_fitting_rgb_jpegs_are_stored_byte_for_byte(imagenet, tmp_path):
    _convert(imagenet / "ILSVRC2012_img_train.tar", tmp_path / "t.beton")
    reader = BetonReader(tmp_path / "t.beton")
    for i in range(len(reader)):  # order: class, then name; 6 images per class
        synset, n = SYNSETS[reader[i][1]], 10 + i % 6
        source = (imagenet / "train" / synset / f"{synset}_{n}.JPEG").read_bytes()
        stored = reader[i][0].tobytes()
        assert (stored == source) == (n in (10, 11)), (synset, n)  # baseline and progressive RGB within 128 px
        assert Image.open(io.BytesIO(stored)).mode == "RGB" and max(reader.heights[i], reader.widths[i]) <= 128

    summary = _convert(imagenet / "ILSVRC2012_img_train.tar", tmp_path / "r.beton", reencode=True)
    assert summary.stored_as_is == 0 and summary.reencoded["--reencode"] == 6
    assert BetonReader(tmp_path / "r.beton")[0][0].tobytes() != reader[0][0].tobytes()


def test_classes_and_limit_on_the_train_archive(imagenet, tmp_path):
    summary = _convert(imagenet / "ILSVRC2012_img_train.tar", tmp_path / "s.beton", classes=2, limit=5)
    reader = BetonReader(tmp_path / "s.beton")
    assert reader.classes == SYNSETS[:2] and summary.written == 5
    assert np.bincount(reader.labels).tolist() == [3, 2]


LABELS = ["LOC_val_solution.csv", "val_labels.txt", "devkit"]


@pytest.fixture
def fake_scipy(monkeypatch):
    """scipy.io.loadmat returning a devkit's `synsets`: ids in meta.mat order, one non-leaf synset."""
    rows = [(3, SYNSETS[0], 0), (1, SYNSETS[1], 0), (2, SYNSETS[2], 0), (4, "n09999999", 0), (1001, "n00001740", 7)]
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io = types.ModuleType("scipy.io")
    scipy_io.loadmat = lambda f, squeeze_me: {"synsets": synsets}
    monkeypatch.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
    monkeypatch.setitem(sys.modules, "scipy.io", scipy_io)
    return {synset: i for i, synset, _ in rows}


def _devkit(path: Path, truth: dict[str, str], ids: dict[str, int]) -> Path:
    """ILSVRC2012_devkit_t12.tar.gz: the ground truth as ids, one line per val image 1..7 (8 and 9: none)."""
    lines = [str(ids[truth[f"ILSVRC2012_val_{i:08d}.JPEG"]]) for i in range(1, 8)] if truth else ["1"]
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", b"MATLAB 5.0 MAT-file")
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", "\n".join(lines).encode())
    return path


def _val_truth(imagenet: Path) -> dict[str, str]:
    pairs = (line.split() for line in (imagenet / "val_labels.txt").read_text().splitlines())
    return dict(pairs)


@pytest.mark.parametrize("labels", LABELS)
def test_val_archive_with_labels(imagenet, tmp_path, labels, fake_scipy):
    _convert(imagenet / "ILSVRC2012_img_train.tar", tmp_path / "train.beton")
    if labels == "devkit":
        labels_file = _devkit(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", _val_truth(imagenet), fake_scipy)
    else:
        labels_file = imagenet / labels
    summary = _convert(
        imagenet / "ILSVRC2012_img_val.tar",
        tmp_path / "val.beton",
        labels=labels_file,
        classes_from=tmp_path / "train.beton.classes.json",
    )
    reader = BetonReader(tmp_path / "val.beton")
    assert reader.classes == SYNSETS and summary.written == 7 and summary.stored_as_is == 7
    expected = [SYNSETS.index(_val_truth(imagenet)[f"ILSVRC2012_val_{i:08d}.JPEG"]) for i in range(1, 8)]
    assert reader.labels.tolist() == expected
    reasons = {item["path"]: item["reason"] for item in _report(tmp_path / "val.beton")["skipped_files"]}
    unknown = f"synset n09999999 is not among the 3 classes of {tmp_path / 'train.beton.classes.json'}"
    assert reasons == {
        "ILSVRC2012_val_00000008.JPEG": "no label in the labels file",
        "ILSVRC2012_val_00000009.JPEG": "no label in the labels file" if labels == "devkit" else unknown,
    }


def test_flat_folder_with_labels_equals_the_flat_archive(imagenet, tmp_path):
    labels = imagenet / "val_labels.txt"
    a = _convert(imagenet / "ILSVRC2012_img_val.tar", tmp_path / "a.beton", labels=labels)
    b = _convert(imagenet / "val_flat", tmp_path / "b.beton", labels=labels)
    assert (tmp_path / "a.beton").read_bytes() == (tmp_path / "b.beton").read_bytes()
    assert a.num_classes == b.num_classes == 4  # the labels' own synsets, n09999999 included
    assert BetonReader(tmp_path / "a.beton").classes == [*SYNSETS, "n09999999"]


def test_classes_and_limit_on_the_val_archive(imagenet, tmp_path):
    """--classes keeps the first N of train's classes (their labels unchanged); --limit spreads over them."""
    (tmp_path / "classes.json").write_text(json.dumps(SYNSETS))
    summary = _convert(
        imagenet / "ILSVRC2012_img_val.tar",
        tmp_path / "v.beton",
        labels=imagenet / "val_labels.txt",
        classes_from=tmp_path / "classes.json",
        classes=2,
        limit=3,
    )
    reader = BetonReader(tmp_path / "v.beton")
    assert reader.classes == SYNSETS[:2] and summary.written == 3
    assert sorted(np.bincount(reader.labels).tolist()) == [1, 2]
    reasons = {item["path"]: item["reason"] for item in _report(tmp_path / "v.beton")["skipped_files"]}
    assert set(reasons) <= {"ILSVRC2012_val_00000008.JPEG", "ILSVRC2012_val_00000009.JPEG"}  # no class-3 image


def test_devkit_read_by_scipy(imagenet, tmp_path):
    """A real meta.mat (written by scipy, as MATLAB writes the devkit's): the ids map to their synsets."""
    sio = pytest.importorskip("scipy.io")
    rows = [(2, SYNSETS[1], 0), (1, SYNSETS[0], 0), (3, SYNSETS[2], 0), (1001, "n00001740", 3)]
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    meta = io.BytesIO()
    sio.savemat(meta, {"synsets": synsets})
    expected = [_val_truth(imagenet)[f"ILSVRC2012_val_{i:08d}.JPEG"] for i in range(1, 8)]
    lines = [str({SYNSETS[1]: 2, SYNSETS[0]: 1, SYNSETS[2]: 3}[synset]) for synset in expected]
    with tarfile.open(tmp_path / "devkit.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", "\n".join(lines).encode())
    _convert(imagenet / "ILSVRC2012_img_val.tar", tmp_path / "v.beton", labels=tmp_path / "devkit.tar.gz")
    reader = BetonReader(tmp_path / "v.beton")
    assert reader.classes == SYNSETS
    assert [reader.classes[label] for label in reader.labels] == expected


def test_devkit_without_scipy_is_a_one_line_error(imagenet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    devkit = _devkit(tmp_path / "devkit.tar.gz", {}, {})
    with pytest.raises(LabelsError, match="needs scipy"):
        _convert(imagenet / "ILSVRC2012_img_val.tar", tmp_path / "v.beton", labels=devkit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devkit.tar.gz"]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("truncated_train", "truncated or damaged tar archive"),
        ("truncated_val", "truncated or damaged tar archive"),
        ("foreign", "is neither a folder nor a readable tar archive"),
        ("flat_without_labels", "no class archives (<synset>.tar)"),
        ("bad_labels", "expected 'filename synset'"),
        ("classes_from_without_labels", "--classes-from needs --labels"),
    ],
)
def test_bad_archives_are_one_line_errors(imagenet, tmp_path, case, fragment):
    dst, extra = tmp_path / "out" / "x.beton", []
    dst.parent.mkdir()
    src = tmp_path / "src.tar"
    if case == "truncated_train":
        data = (imagenet / "ILSVRC2012_img_train.tar").read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif case == "truncated_val":
        data = (imagenet / "ILSVRC2012_img_val.tar").read_bytes()
        src.write_bytes(data[: len(data) * 2 // 3])
        extra = ["--labels", str(imagenet / "val_labels.txt")]
    elif case == "foreign":
        src.write_bytes(os.urandom(5000))
    elif case == "flat_without_labels":
        src = imagenet / "ILSVRC2012_img_val.tar"
    elif case == "bad_labels":
        (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764 extra\n")
        src, extra = imagenet / "ILSVRC2012_img_val.tar", ["--labels", str(tmp_path / "labels.txt")]
    elif case == "classes_from_without_labels":
        src, extra = imagenet / "train", ["--classes-from", str(tmp_path / "x.json")]
    proc = run_prep("convert", str(src), str(dst), "--workers", "2", "--no-progress", *extra)
    assert_one_line_error(proc, fragment)
    assert list(dst.parent.iterdir()) == []


def test_archive_progress_bar_and_summary(imagenet, tmp_path):
    proc = run_prep(
        "convert", str(imagenet / "ILSVRC2012_img_train.tar"), str(tmp_path / "p.beton"), "--max-resolution", "128"
    )
    assert proc.returncode == 0, proc.stderr
    assert "18 images, skipped 2" in proc.stderr and "B/s" in proc.stderr  # the bar: bytes, ETA, images
    assert "6 stored as they were, 12 re-encoded (not RGB: 6," in proc.stdout


@pytest.fixture(scope="module")
def slow_archive(tmp_path_factory) -> Path:
    """A flat tar of 400 copies of one smooth 1600x1200 JPEG (small file, 2 megapixels to decode and encode):
    seconds of work for 2 workers with --reencode."""
    root = tmp_path_factory.mktemp("slow_archive")
    jpeg = _jpeg(smooth_image(np.random.default_rng(3), 1600, 1200))
    names = [f"img_{i:05d}.JPEG" for i in range(400)]
    (root / "val.tar").write_bytes(_tar_bytes(dict.fromkeys(names, jpeg), names))
    (root / "labels.txt").write_text("".join(f"{n} c{i % 3}\n" for i, n in enumerate(names)))
    return root


def test_interrupted_archive_conversion_leaves_nothing(slow_archive, tmp_path):
    dst = tmp_path / "interrupted.beton"
    extra = ["--labels", str(slow_archive / "labels.txt"), "--reencode", "--max-resolution", "1600"]
    proc = start_conversion(slow_archive / "val.tar", dst, *extra)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].endswith("interrupted") and "Traceback" not in stderr, stderr
    assert_nothing_left(proc, dst)
