"""data_prep.folder: what an ImageFolder scan lists and what it reports (hidden folders, link loops)."""

import json
import os
from pathlib import Path

from PIL import Image
from prep_testing import run_prep

from data_prep.folder import scan_image_folder


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path, "JPEG")


def test_hidden_folders_are_skipped_at_any_depth(tmp_path):
    _image(tmp_path / "cat" / "a.JPEG")
    _image(tmp_path / "cat" / "sub" / "b.JPEG")
    _image(tmp_path / "cat" / ".thumbnails" / "a.JPEG")
    _image(tmp_path / "cat" / "sub" / ".git" / "objects" / "c.JPEG")
    _image(tmp_path / ".cache" / "x.JPEG")
    scan = scan_image_folder(tmp_path)
    assert scan.classes == ["cat"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p, _ in scan.samples] == ["cat/a.JPEG", "cat/sub/b.JPEG"]
    assert scan.skipped == [
        {"path": ".cache/", "reason": "hidden folder, not a class"},
        {"path": "cat/.thumbnails/", "reason": "hidden folder"},
        {"path": "cat/sub/.git/", "reason": "hidden folder"},
    ]


def test_symlink_loops_are_reported_not_fatal(tmp_path):
    src = tmp_path / "src"
    _image(src / "a" / "x.JPEG")
    _image(src / "b" / "y.JPEG")
    os.symlink("self", src / "a" / "self")  # a link to itself
    os.symlink("two", src / "b" / "one")  # two links to each other
    os.symlink("one", src / "b" / "two")
    os.symlink("top", src / "top")  # beside the class folders
    os.symlink(".", src / "b" / "here")  # a folder loop: each folder is listed once
    scan = scan_image_folder(src)
    assert scan.classes == ["a", "b"]
    reasons = {item["path"]: item["reason"] for item in scan.skipped}
    loop = "unreadable: Too many levels of symbolic links"
    assert reasons == {"top": loop, "a/self": loop, "b/one": loop, "b/two": loop}

    dst = tmp_path / "out.beton"
    proc = run_prep("convert", str(src), str(dst), "--no-progress", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.beton.report.json").read_text())
    assert report["written"] == 2
    assert {item["path"] for item in report["skipped_files"]} == set(reasons)
