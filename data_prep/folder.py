"""Scan an ImageFolder tree (SRC/<class>/<image>, sub-folders allowed): classes, labelled files, and the rest."""

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FolderScan:
    classes: list[str]  # class folder names, sorted: label = index
    samples: list[tuple[str, int]]  # (path, label), by class then path
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: entries that are no candidate image


def scan_image_folder(src: Path, num_classes: int | None = None) -> FolderScan:
    """Lists the files of the first `num_classes` class folders (all by default) of `src`.

    Every regular file is a candidate (its content, not its name, decides later whether it is an image).
    Reported, not listed: files beside the class folders, hidden folders (at any depth), broken links, link
    loops, special files, unreadable folders. An empty class folder keeps its label (train and val labels
    stay aligned).
    """
    scan = FolderScan(classes=[], samples=[])
    class_dirs = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        kind = _kind(entry)
        if kind == "folder" and entry.name.startswith("."):
            scan.skipped.append({"path": entry.name + "/", "reason": "hidden folder, not a class"})
        elif kind == "folder":
            class_dirs.append(entry)
        elif kind == "file":
            scan.skipped.append({"path": entry.name, "reason": "outside the class folders"})
        else:
            scan.skipped.append({"path": entry.name, "reason": kind})
    class_dirs = class_dirs[:num_classes]

    for label, class_dir in enumerate(class_dirs):
        scan.classes.append(class_dir.name)
        scan.samples.extend((f, label) for f in _list_files(Path(class_dir.path), src, scan.skipped))
    return scan


def _list_files(folder: Path, src: Path, skipped: list[dict], seen: set | None = None) -> list[str]:
    """The regular files under `folder`, recursively, sorted; links followed, each folder visited once."""
    seen = set() if seen is None else seen
    try:
        st = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        skipped.append({"path": rel_path(folder, src) + "/", "reason": f"unreadable folder: {e.strerror}"})
        return []
    if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already listed
        return []
    seen.add((st.st_dev, st.st_ino))

    files = []
    for entry in entries:
        kind = _kind(entry)
        if kind == "folder" and entry.name.startswith("."):
            skipped.append({"path": rel_path(entry.path, src) + "/", "reason": "hidden folder"})
        elif kind == "folder":
            files.extend(_list_files(Path(entry.path), src, skipped, seen))
        elif kind == "file":
            files.append(entry.path)
        else:
            skipped.append({"path": rel_path(entry.path, src), "reason": kind})
    return files


def _kind(entry: os.DirEntry) -> str:
    """'folder' or 'file' (links followed), else why the entry is no candidate: a broken link, a link loop, ..."""
    try:
        if entry.is_dir():
            return "folder"
        if entry.is_file():
            return "file"
    except OSError as e:  # ELOOP (a link that points back to itself), EACCES, ... raise; ENOENT does not
        return f"unreadable: {e.strerror}"
    return "unreadable: broken symbolic link" if entry.is_symlink() else "not a regular file"


def rel_path(path: str | Path, src: Path) -> str:
    """`path` relative to the tree's root, with forward slashes: how reports name files."""
    return Path(path).relative_to(src).as_posix()


def take_evenly(samples: list[tuple[str, int]], num_classes: int, limit: int) -> list[tuple[str, int]]:
    """At most `limit` samples spread evenly over the classes (a class with too few gives its share to the
    others), the first files of each class, in the original order."""
    per_class = [0] * num_classes
    for _, label in samples:
        per_class[label] += 1
    quota = [0] * num_classes
    left = min(limit, len(samples))
    while left:
        open_classes = [c for c in range(num_classes) if quota[c] < per_class[c]]
        share = max(1, left // len(open_classes))
        for c in open_classes:
            extra = min(share, per_class[c] - quota[c], left)
            quota[c] += extra
            left -= extra
    taken = [0] * num_classes
    kept = []
    for path, label in samples:
        if taken[label] < quota[label]:
            taken[label] += 1
            kept.append((path, label))
    return kept
