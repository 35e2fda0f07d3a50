"""data_prep.convert: ImageFolder -> .beton round trip, bad inputs and their report, subsets, atomic writes."""

import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from _fixtures import overwritten_scan
from PIL import Image
from prep_testing import (
    assert_nothing_left,
    assert_one_line_error,
    dead_pid,
    processes_mentioning,
    run_prep,
    smooth_image,
    start_conversion,
)

from data_prep.convert import ConversionError, convert
from data_prep.folder import take_evenly
from data_prep.images import target_size
from data_prep.writer import page_size_for
from mugs_fast.data.beton import BetonReader


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
    assert json.loads((tmp_path / "out.beton.classes.json").read_text()) == ["ant", "bee", "cat"]

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
        # JPEG q90 and a DCT-scaled decode of the large ones: ~1 grey level, ~3 for the 19-px-wide ones (chroma
        # blocks of 16 px); a wrong picture is off by tens
        assert np.abs(got - expected).mean() < 5.0, path


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
    assert json.loads((tmp_path / "sub.beton.report.json").read_text())["settings"]["limit"] == 5


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
    noise = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    (bad / "damaged_scan.JPEG").write_bytes(overwritten_scan(save_jpeg(noise, root / "noise.jpg").read_bytes()))
    (root / "noise.jpg").unlink()
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
    report = json.loads((tmp_path / "bad.beton.report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped_files"]}
    assert reasons.pop("b_mixed/truncated.JPEG").startswith("cannot decode JPEG: no end-of-image marker")
    assert reasons.pop("b_mixed/damaged_scan.JPEG").startswith("cannot decode JPEG: Corrupt JPEG data")
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
    assert (summary.written, summary.skipped, summary.converted) == (7, 9, 5)
    assert summary.empty_classes == ["c_empty"] and report["empty_classes"] == ["c_empty"]
    assert report["images_per_class"] == {"a_good": 1, "b_mixed": 6, "c_empty": 0}
    assert report["written"] == 7 and report["skipped"] == 9

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
    assert json.loads((tmp_path / "x.beton.report.json").read_text())["skipped_files"][0]["path"] == "a/x.JPEG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "x.beton.report.json"]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.beton",
        "out.beton.classes.json",
        "out.beton.report.json",
    ]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing_src", ["does not exist"]),
        ("file_src", ["is neither a folder nor a readable tar archive"]),
        ("no_class_folders", ["no class folders"]),
        ("no_images", ["no images in the 2 class folders"]),
        ("dst_folder_missing", ["does not exist"]),
        ("too_many_classes", ["asked for 9 classes"]),
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
    assert_one_line_error(run_prep("convert", str(src), str(dst), *extra), *fragments)
    assert not dst.exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--max-resolution", "0"], "--max-resolution: must be 1..8192, got 0"),
        (["--max-resolution", "65535"], "--max-resolution: must be 1..8192, got 65535"),  # a 64 GiB page
        (["--max-resolution", "big"], "--max-resolution: expected an integer, got 'big'"),
        (["--jpeg-quality", "0"], "--jpeg-quality: must be 1..100, got 0"),
        (["--jpeg-quality", "101"], "--jpeg-quality: must be 1..100, got 101"),
        (["--workers", "0"], "--workers: must be 1..1024, got 0"),
        (["--limit", "0"], "--limit: must be >= 1, got 0"),
        (["--classes", "-1"], "--classes: must be >= 1, got -1"),
    ],
)
def test_cli_ranges_are_usage_errors(folder, tmp_path, argv, fragment):
    dst = tmp_path / "out.beton"
    assert_one_line_error(run_prep("convert", str(folder), str(dst), *argv), fragment, status=2)
    assert list(tmp_path.iterdir()) == []


def test_max_resolution_is_bounded_by_the_page_size(folder, tmp_path):
    with pytest.raises(ConversionError, match="max resolution must be in 1..8192, got 9000"):
        convert(folder, tmp_path / "out.beton", max_resolution=9000, progress=False)
    with pytest.raises(ValueError, match="1..8192"):
        page_size_for(9000)
    assert page_size_for(8192) == 1 << 30 and page_size_for(512) == 1 << 23


def test_side_files_are_named_from_the_full_output_name(folder, tmp_path):
    convert(folder, tmp_path / "data.beton", classes=2, max_resolution=32, progress=False)
    convert(folder, tmp_path / "data.v2", classes=3, max_resolution=32, progress=False)
    assert BetonReader(tmp_path / "data.beton").classes == ["ant", "bee"]  # not rewritten by the second
    assert BetonReader(tmp_path / "data.v2").classes == ["ant", "bee", "cat"]
    assert json.loads((tmp_path / "data.beton.report.json").read_text())["num_classes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data.beton",
        "data.beton.classes.json",
        "data.beton.report.json",
        "data.v2",
        "data.v2.classes.json",
        "data.v2.report.json",
    ]


def test_no_report_unless_the_beton_is_in_place(folder, tmp_path, monkeypatch):
    dst = tmp_path / "out.beton"
    real_replace = os.replace

    def failing_replace(src, target):
        if Path(target) == dst:
            raise OSError(28, "No space left on device", str(target))
        real_replace(src, target)

    monkeypatch.setattr("data_prep.convert.os.replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        convert(folder, dst, max_resolution=32, progress=False)
    assert list(tmp_path.iterdir()) == []  # no report of a success, no class list, no temporaries


def test_stale_temporaries_of_dead_conversions_are_removed(folder, tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = [f".out.beton.tmp-{dead}", f".out.beton.report.json.tmp-{dead}", f".out.beton.classes.json.tmp-{dead}"]
    kept = [f".out.beton.tmp-{alive}", f".other.beton.tmp-{dead}", ".out.beton.tmp-notapid"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    convert(folder, tmp_path / "out.beton", max_resolution=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.beton", "out.beton.classes.json", "out.beton.report.json", *kept]
    )


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_conversion_leaves_nothing(slow_folder, tmp_path, sig):
    dst = tmp_path / "interrupted.beton"
    proc = start_conversion(slow_folder, dst)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        proc.send_signal(sig)  # `kill PID`: only the main process
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines()[-1].endswith("interrupted") and "Traceback" not in stderr, stderr
    assert_nothing_left(proc, dst)


def test_rerun_after_kill_9_removes_the_temporary(slow_folder, tmp_path):
    dst = tmp_path / "killed.beton"
    proc = start_conversion(slow_folder, dst)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: the temporary stays
    proc.communicate(timeout=60)
    assert [p.name for p in tmp_path.iterdir()] == [f".killed.beton.tmp-{proc.pid}"]
    assert run_prep("convert", str(slow_folder), str(dst), "--limit", "6", "--no-progress").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "killed.beton",
        "killed.beton.classes.json",
        "killed.beton.report.json",
    ]


def test_killed_worker_is_an_error_not_a_hang(slow_folder, tmp_path):
    dst = tmp_path / "killed.beton"
    proc = start_conversion(slow_folder, dst)
    workers = [pid for pid in processes_mentioning(str(dst)) if pid != proc.pid]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "a worker process died" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr
    assert_nothing_left(proc, dst)


def _start_worker(started, stopping) -> None:
    from data_prep.convert import _init_worker

    _init_worker(started, stopping)
    time.sleep(60)  # a worker that went on would wait here for tasks


@pytest.mark.parametrize("stopping", [0, 1])
def test_a_worker_starting_while_the_pool_stops_leaves_by_itself(stopping):
    # Python drops a SIGTERM that lands between a worker's fork and its after-fork set-up: a worker started as the
    # pool terminates must see that for itself, or the pool's join waits for it forever
    import multiprocessing

    started, flag = multiprocessing.Value("i", 0), multiprocessing.Value("b", stopping)
    worker = multiprocessing.get_context("fork").Process(target=_start_worker, args=(started, flag))
    worker.start()
    worker.join(timeout=20 if stopping else 2)  # one that goes on is still waiting after 2 s
    try:
        assert (worker.exitcode == 0) == bool(stopping) and started.value == 1 - stopping
    finally:
        worker.kill()
        worker.join()
