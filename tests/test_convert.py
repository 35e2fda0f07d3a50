"""data_prep.convert: ImageFolder -> .beton round trip, bad inputs and their report, subsets, atomic writes."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prep_testing import REPO, assert_one_line_error, run_prep

from data_prep.convert import ConversionError, convert
from data_prep.folder import take_evenly
from data_prep.images import target_size
from mugs_fast.data.beton import BetonReader


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-frequency content: JPEG and resampling errors stay small, so pixel comparisons can be tight."""
    coarse = rng.uniform(0, 255, size=(3, 3, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def save_jpeg(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=95, **kwargs)
    return path


def decode(jpeg: np.ndarray) -> np.ndarray:
    img = Image.open(io.BytesIO(jpeg.tobytes()))
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 4 images of various sizes: small (kept), 1-2x max_resolution (resized), >= 2x (draft decode)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    sizes = [(60, 45), (150, 110), (400, 300), (70, 350)]
    for name in ("cat", "ant", "bee"):
        for i, (w, h) in enumerate(sizes):
            save_jpeg(smooth_image(rng, w, h), root / name / f"{name}{i}.JPEG")
    return root


def test_round_trip(folder, tmp_path):
    dst = tmp_path / "out.beton"
    summary = convert(folder, dst, max_resolution=96, workers=2, progress=False)
    assert (summary.written, summary.skipped, summary.num_classes) == (12, 0, 3)
    assert summary.bytes == dst.stat().st_size
    assert json.loads((tmp_path / "out.classes.json").read_text()) == ["ant", "bee", "cat"]

    reader = BetonReader(dst)
    files = sorted(folder.glob("*/*.JPEG"))  # class, then file order: the order of the .beton
    assert len(reader) == len(files) and reader.classes == ["ant", "bee", "cat"]
    for i, path in enumerate(files):
        jpeg, label = reader[i]
        assert label == reader.classes.index(path.parent.name)
        src = Image.open(path).convert("RGB")
        size = target_size(*src.size, 96)
        assert (reader.widths[i], reader.heights[i]) == size
        expected = np.asarray(src.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
        got = decode(jpeg)
        assert got.shape == expected.shape
        assert np.abs(got - expected).mean() < 3.0, path  # JPEG q90 + DCT-scaled decode of the large ones


def test_output_is_deterministic(folder, tmp_path):
    a = convert(folder, tmp_path / "a.beton", max_resolution=64, workers=1, progress=False)
    b = convert(folder, tmp_path / "b.beton", max_resolution=64, workers=2, progress=False)
    assert a.written == b.written
    assert (tmp_path / "a.beton").read_bytes() == (tmp_path / "b.beton").read_bytes()


def test_classes_and_limit(folder, tmp_path):
    summary = convert(folder, tmp_path / "sub.beton", classes=2, limit=5, max_resolution=64, progress=False)
    reader = BetonReader(tmp_path / "sub.beton")
    assert reader.classes == ["ant", "bee"] and summary.written == 5
    assert sorted(np.bincount(reader.labels).tolist()) == [2, 3]  # spread evenly over the two classes
    assert json.loads((tmp_path / "sub.report.json").read_text())["settings"]["limit"] == 5


def test_take_evenly():
    samples = [("a", 0)] * 1 + [("b", 1)] * 5 + [("c", 2)] * 5
    kept = take_evenly(samples, 3, 7)
    assert np.bincount([label for _, label in kept]).tolist() == [1, 3, 3]
    assert take_evenly(samples, 3, 100) == samples
    assert [label for _, label in kept] == sorted(label for _, label in kept)  # original order kept


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    """One class folder full of trouble, one good class, one empty class, and debris around them."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    good = smooth_image(rng, 80, 60)
    bad = root / "b_mixed"
    save_jpeg(good, bad / "good.JPEG")
    full = save_jpeg(smooth_image(rng, 120, 90), root / "scratch.jpg").read_bytes()
    (root / "scratch.jpg").unlink()
    (bad / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (bad / "corrupt_header.JPEG").write_bytes(full[:3] + bytes(200) + full[203:])
    (bad / "zero.JPEG").write_bytes(b"")
    good.save(bad / "png_inside.JPEG", "PNG")
    save_jpeg(good.convert("CMYK"), bad / "cmyk.JPEG")
    save_jpeg(good.convert("L"), bad / "gray.JPEG")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(bad / "palette.JPEG", "GIF")
    good.convert("RGBA").save(bad / "rgba.png")
    (bad / "notes.txt").write_text("not an image\n")
    os.symlink(bad / "missing.JPEG", bad / "dangling.JPEG")
    if os.geteuid() == 0:  # root reads any file whatever its mode: use one whose read fails with EIO
        os.symlink("/proc/self/mem", bad / "unreadable.JPEG")
    else:
        save_jpeg(good, bad / "unreadable.JPEG").chmod(0)
    save_jpeg(good, root / "a_good" / "x.JPEG")
    (root / "c_empty").mkdir()
    (root / ".hidden").mkdir()
    (root / "LOC_val_solution.csv").write_text("id,label\n")
    return root


def test_bad_inputs_are_reported(bad_folder, tmp_path):
    dst = tmp_path / "bad.beton"
    summary = convert(bad_folder, dst, max_resolution=96, workers=2, progress=False)
    report = json.loads((tmp_path / "bad.report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped_files"]}
    assert reasons.pop("b_mixed/truncated.JPEG").startswith("cannot decode JPEG: OSError: image file is truncated")
    assert reasons.pop("b_mixed/corrupt_header.JPEG") == "cannot decode JPEG: corrupt header"
    assert reasons.pop("b_mixed/zero.JPEG") == "empty file (0 bytes)"
    assert reasons.pop("b_mixed/notes.txt") == "not an image (unrecognised format)"
    assert reasons.pop("b_mixed/dangling.JPEG") == "unreadable: broken symbolic link"
    assert reasons.pop("b_mixed/unreadable.JPEG").startswith("unreadable: ")
    assert reasons.pop(".hidden/") == "hidden folder, not a class"
    assert reasons.pop("LOC_val_solution.csv") == "outside the class folders"
    assert not reasons

    converted = {item["path"]: item["source"] for item in report["converted_files"]}
    assert converted == {
        "b_mixed/cmyk.JPEG": "JPEG CMYK",
        "b_mixed/gray.JPEG": "JPEG L",
        "b_mixed/palette.JPEG": "GIF P",
        "b_mixed/png_inside.JPEG": "PNG RGB",
        "b_mixed/rgba.png": "PNG RGBA",
    }
    assert (summary.written, summary.skipped, summary.converted) == (7, 8, 5)
    assert summary.empty_classes == ["c_empty"] and report["empty_classes"] == ["c_empty"]
    assert report["images_per_class"] == {"a_good": 1, "b_mixed": 6, "c_empty": 0}
    assert report["written"] == 7 and report["skipped"] == 8

    reader = BetonReader(dst)
    assert reader.classes == ["a_good", "b_mixed", "c_empty"]  # the empty class keeps its label
    reference = np.asarray(Image.open(bad_folder / "b_mixed" / "good.JPEG"), dtype=np.float32)
    for i in range(len(reader)):
        img = decode(reader[i][0])  # every stored image is RGB and the right size
        assert img.shape == reference.shape
    gray = decode(reader[3][0])  # order in b_mixed: cmyk, good, gray, palette, png_inside, rgba
    assert np.abs(gray[..., 0] - gray[..., 2]).max() < 8  # grayscale stays gray
    assert np.abs(decode(reader[5][0]) - reference).mean() < 3  # PNG under a .JPEG name: same picture


def test_undecodable_only_is_an_error(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.JPEG").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with pytest.raises(ConversionError, match="none of the 1 files could be decoded"):
        convert(tmp_path / "src", tmp_path / "x.beton", progress=False)
    assert not (tmp_path / "x.beton").exists()
    assert json.loads((tmp_path / "x.report.json").read_text())["skipped_files"][0]["path"] == "a/x.JPEG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "x.report.json"]


def test_existing_dst_is_kept_unless_overwrite(folder, tmp_path):
    dst = tmp_path / "out.beton"
    dst.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="exists"):
        convert(folder, dst, progress=False)
    assert dst.read_bytes() == b"precious"
    proc = run_prep("convert", str(folder), str(dst))
    assert_one_line_error(proc, "exists", "--overwrite")
    assert dst.read_bytes() == b"precious"

    proc = run_prep("convert", str(folder), str(dst), "--overwrite", "--max-resolution", "64", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 12 images of 3 classes" in proc.stdout and "images/s" in proc.stdout
    assert "images/s" in proc.stderr  # the progress bar
    assert len(BetonReader(dst)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "out.classes.json", "out.report.json"]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing_src", ["does not exist"]),
        ("file_src", ["is not a folder"]),
        ("no_class_folders", ["no class folders"]),
        ("no_images", ["no images in the 2 class folders"]),
        ("dst_folder_missing", ["does not exist"]),
        ("too_many_classes", ["asked for 9 classes"]),
        ("bad_quality", ["JPEG quality"]),
    ],
)
def test_cli_errors(case, fragments, tmp_path):
    src, dst, extra = tmp_path / "src", tmp_path / "out.beton", []
    src.mkdir()
    if case == "missing_src":
        src = tmp_path / "nowhere"
    elif case == "file_src":
        src = tmp_path / "file.txt"
        src.write_text("x")
    elif case == "no_class_folders":
        save_jpeg(Image.new("RGB", (8, 8)), src / "flat.JPEG")
    elif case == "no_images":
        (src / "a").mkdir()
        (src / "b").mkdir()
    elif case == "dst_folder_missing":
        save_jpeg(Image.new("RGB", (8, 8)), src / "a" / "x.JPEG")
        dst = tmp_path / "missing" / "out.beton"
    elif case == "too_many_classes":
        save_jpeg(Image.new("RGB", (8, 8)), src / "a" / "x.JPEG")
        extra = ["--classes", "9"]
    elif case == "bad_quality":
        save_jpeg(Image.new("RGB", (8, 8)), src / "a" / "x.JPEG")
        extra = ["--jpeg-quality", "0"]
    assert_one_line_error(run_prep("convert", str(src), str(dst), *extra), *fragments)
    assert not dst.exists()


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    """1,200 links to one 1000x800 noise JPEG: a conversion that runs for several seconds with 2 workers."""
    root = tmp_path_factory.mktemp("slow")
    noise = np.random.default_rng(2).normal(128, 40, size=(800, 1000, 3)).clip(0, 255).astype(np.uint8)
    image = save_jpeg(Image.fromarray(noise), root / "image.jpg")
    for c in range(3):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for i in range(400):
            os.symlink(image, root / "src" / f"c{c}" / f"{i:04d}.JPEG")
    return root / "src"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _start_conversion(src: Path, dst: Path) -> subprocess.Popen:
    """`convert SRC DST` in a subprocess of its own process group, returned once it is writing."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", "convert", str(src), str(dst), "--workers", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as a shell job
    )
    deadline = time.monotonic() + 60
    while not list(dst.parent.glob("*.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # workers busy, pages being written
    assert proc.poll() is None, proc.stderr.read()
    return proc


def _assert_nothing_left(proc: subprocess.Popen, dst: Path) -> None:
    assert list(dst.parent.iterdir()) == []  # no DST, no temporary file, no class list or report
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(dst)) and time.monotonic() < deadline:  # workers share the command line
        time.sleep(0.1)
    assert _processes_mentioning(str(dst)) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_conversion_leaves_nothing(slow_folder, tmp_path, sig):
    dst = tmp_path / "interrupted.beton"
    proc = _start_conversion(slow_folder, dst)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        proc.send_signal(sig)  # `kill PID`: only the main process
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines()[-1].endswith("interrupted") and "Traceback" not in stderr, stderr
    _assert_nothing_left(proc, dst)


def test_killed_worker_is_an_error_not_a_hang(slow_folder, tmp_path):
    dst = tmp_path / "killed.beton"
    proc = _start_conversion(slow_folder, dst)
    workers = [pid for pid in _processes_mentioning(str(dst)) if pid != proc.pid]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "a worker process died" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr
    _assert_nothing_left(proc, dst)
