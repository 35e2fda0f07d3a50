"""Where a conversion's images come from, as one ordered stream of labelled items read by one process.

    SRC/<class>/<image>                  ImageFolder tree (folder.py)                 FolderSource
    ILSVRC2012_img_train.tar             a tar of one tar per class, streamed         ClassArchives
    ILSVRC2012_img_val.tar --labels F    a flat tar of images, streamed               FlatSource
    val/ --labels F                      a flat folder of images                      FlatSource

Every source has `classes` (label = index), `items()` yielding (name, label, data, weight) in the order of the
.beton - `name` as reports give it, `data` a file path (read by the worker) or the bytes read from an archive,
`weight` the progress it stands for in `unit`s - and `skipped` ({"path", "reason"}), which the reader fills
as it meets entries that are no candidate image (and the conversion with images that do not decode).
Nothing is extracted: archives are read front to back (a class archive in one go, so that its images can be
put in name order: the order of the extracted folder, whose .beton is then the same file).
"""

import math
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from data_prep import PrepError
from data_prep.folder import rel_path, scan_image_folder, take_evenly
from data_prep.labels import image_key, read_class_list, read_labels

Item = tuple[str, int, str | bytes, int]  # name, label, path or bytes, progress weight


class ConversionError(PrepError):
    """A conversion that cannot start or produced nothing: bad arguments, paths or input."""


class Source:
    classes: list[str]
    skipped: list[dict]
    total: int  # progress units in all
    unit: str  # " images" or "B"
    chunk_size: int | None = None  # items per worker task; None: sized from `total`
    in_flight: int = 0  # images the workers may hold, at least (beyond a few chunks per worker)

    def items(self) -> Iterator[Item]:
        raise NotImplementedError

    def close(self) -> None:
        """Releases open files (a no-op for folders)."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(
    src: Path,
    *,
    classes: int | None = None,
    limit: int | None = None,
    labels: str | os.PathLike | None = None,
    classes_from: str | os.PathLike | None = None,
) -> Source:
    """The source for `src` (see the module docstring); raises ConversionError (one line) for bad input."""
    if not src.exists():
        raise ConversionError(f"SRC {src} does not exist")
    if classes_from is not None and labels is None:
        raise ConversionError("--classes-from needs --labels (it names the classes of a flat, labelled SRC)")
    if labels is not None:
        return FlatSource(src, read_labels(labels), classes_from, classes, limit)
    if src.is_dir():
        return FolderSource(src, classes, limit)
    return ClassArchives(src, classes, limit)


def _check_class_count(src: Path, wanted: int | None, found: int, what: str) -> None:
    if not found:
        raise ConversionError(f"no {what} in {src}")
    if wanted is not None and found < wanted:
        raise ConversionError(f"asked for {wanted} classes but {src} has {found} {what}")


class FolderSource(Source):
    """An ImageFolder tree, scanned up front (folder.py); the workers read the files."""

    unit = " images"

    def __init__(self, src: Path, classes: int | None, limit: int | None):
        try:
            scan = scan_image_folder(src, classes)
        except OSError as e:
            raise ConversionError(f"cannot read SRC {src}: {e.strerror}") from None
        if not scan.classes:
            raise ConversionError(f"no class folders in {src}: expected the ImageFolder layout SRC/<class>/<image>")
        _check_class_count(src, classes, len(scan.classes), "class folders")
        if not scan.samples:
            raise ConversionError(f"no images in the {len(scan.classes)} class folders of {src}")
        self.src, self.classes, self.skipped = src, scan.classes, scan.skipped
        self.samples = take_evenly(scan.samples, len(scan.classes), limit) if limit else scan.samples
        self.total = len(self.samples)

    def items(self) -> Iterator[Item]:
        for path, label in self.samples:
            yield rel_path(path, self.src), label, path, 1


def _open_tar(src: Path, mode: str, fileobj=None) -> tarfile.TarFile:
    """`src` opened as a tar (mode 'r:' to seek, 'r|*' to stream from `fileobj`); ConversionError if it is none."""
    try:
        return tarfile.open(None if fileobj else src, mode, fileobj)
    except (tarfile.TarError, EOFError) as e:
        if fileobj:
            fileobj.close()
        raise ConversionError(f"SRC {src} is neither a folder nor a readable tar archive ({e})") from None


def _hidden(name: str) -> bool:
    """Whether a member lies in a folder a user would call hidden (a part of its folder path starts with '.')."""
    return any(part.startswith(".") and part not in (".", "..") for part in PurePosixPath(name).parent.parts)


class ClassArchives(Source):
    """ILSVRC2012_img_train.tar: a tar of `<synset>.tar` archives, one per class, each a flat tar of JPEGs.

    The outer archive's headers are listed first (a seek from one class archive to the next): a truncated or
    foreign archive is an error before anything is converted, and the classes (sorted, label = index) are known.
    Each class archive is then streamed (tarfile mode 'r|') and its images put in name order.
    """

    unit = "B"
    chunk_size = 16
    in_flight = 2048  # more than a class (ImageNet: 732-1,300): the workers stay busy while the next one is read

    def __init__(self, src: Path, classes: int | None, limit: int | None):
        self.src, self.limit, self.skipped = src, limit, []
        self._tar = _open_tar(src, "r:")
        try:
            self._list_classes(classes)
        except BaseException:
            self._tar.close()
            raise

    def _list_classes(self, classes: int | None) -> None:
        try:
            members = self._tar.getmembers()  # reads every header; a truncated archive raises here
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ConversionError(f"SRC {self.src}: truncated or damaged tar archive ({e})") from None
        src, archives = self.src, {}
        for m in members:
            if m.isfile() and m.name.endswith(".tar") and not _hidden(m.name):
                archives[PurePosixPath(m.name).stem] = m
            elif not m.isdir():
                self.skipped.append({"path": m.name, "reason": "outside the class archives"})
        if not archives:
            raise ConversionError(f"no class archives (<synset>.tar) in {src}: a flat archive needs --labels FILE")
        _check_class_count(src, classes, len(archives), "class archives")
        self.classes = sorted(archives)[:classes]
        self._archives = [archives[name] for name in self.classes]
        self.total = sum(m.size for m in self._archives)

    def items(self) -> Iterator[Item]:
        left = self.limit
        for label, archive in enumerate(self._archives):
            if left == 0:  # the limit is reached: the other class archives are not read
                return
            images = self._read_class(archive)
            if left is not None:  # spread evenly: the classes still to come share what is left
                images = images[: math.ceil(left / (len(self._archives) - label))]
                left -= len(images)
            weight = archive.size // max(1, len(images))
            for name, data in images:
                yield f"{archive.name}/{name}", label, data, weight

    def _read_class(self, archive: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        """The images of one class archive, in name order; what is not an image file is reported."""
        images = []
        try:
            with tarfile.open(fileobj=self._tar.extractfile(archive), mode="r|") as inner:
                for m in inner:
                    if m.isfile() and not _hidden(m.name):
                        images.append((m.name, inner.extractfile(m).read()))
                    elif m.isfile():
                        self.skipped.append({"path": f"{archive.name}/{m.name}", "reason": "in a hidden folder"})
                    elif not m.isdir():
                        self.skipped.append({"path": f"{archive.name}/{m.name}", "reason": "not a regular file"})
        except (tarfile.TarError, EOFError, OSError) as e:
            reason = f"unreadable class archive after {len(images)} images: {e}"
            self.skipped.append({"path": archive.name, "reason": reason})
        return sorted(images)

    def close(self) -> None:
        self._tar.close()


class FlatSource(Source):
    """A flat tar (streamed, 'r|*': any compression) or folder of images labelled by a labels file.

    Classes: those of `classes_from` (train's class list, so that labels agree), else the synsets of the labels,
    sorted. An image without a label, or with a synset outside the classes, is skipped and reported; with
    `classes` (the first N) or `limit` (spread evenly over the labelled images), images of the other classes,
    or over their class's share, are left out. A tar is read only until every share is full.
    """

    def __init__(self, src, labels, classes_from, classes: int | None, limit: int | None):
        self.src, self.labels, self.skipped = src, labels, []
        every = read_class_list(classes_from) if classes_from else sorted(set(labels.values()))
        _check_class_count(src, classes, len(every), "classes in the labels")
        self.classes = every[:classes]
        self._index = {name: i for i, name in enumerate(every)}
        self._outside = f"not among the {len(every)} classes" + (f" of {classes_from}" if classes_from else "")
        if src.is_dir():
            self._files = self._list_folder(src)
            self.unit, self.total = " images", len(self._files)
            names = [name for name, _ in self._files]
        else:
            self._raw = open(src, "rb")
            self._tar = _open_tar(src, "r|*", self._raw)
            self.unit, self.total, self.chunk_size = "B", src.stat().st_size, 16
            names = sorted(labels)
        self._quota = self._quotas(names, limit)

    def _list_folder(self, src: Path) -> list[tuple[str, str]]:
        files = []
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if entry.is_file():
                files.append((entry.name, entry.path))
            else:
                self.skipped.append({"path": entry.name, "reason": "not a file of a flat, labelled folder"})
        return files

    def _label_of(self, name: str) -> int | str | None:
        """The label of image `name`; why it has none (a str); None for a class left out by --classes."""
        synset = self.labels.get(image_key(name))
        if synset is None:
            return "no label in the labels file"
        if synset not in self._index:
            return f"synset {synset} is {self._outside}"
        label = self._index[synset]
        return label if label < len(self.classes) else None

    def _quotas(self, names: list[str], limit: int | None) -> list[int] | None:
        """Images to take per class: all (None), or `limit` spread evenly over the labelled `names`."""
        if limit is None:
            return None
        labelled = [(name, label) for name in names if isinstance(label := self._label_of(name), int)]
        quota = [0] * len(self.classes)
        for _, label in take_evenly(labelled, len(self.classes), limit):
            quota[label] += 1
        return quota

    def items(self) -> Iterator[Item]:
        taken = [0] * len(self.classes)
        try:
            for name, read, weight in self._entries():
                label = self._label_of(name)
                if isinstance(label, str):
                    self.skipped.append({"path": name, "reason": label})
                elif label is not None and (self._quota is None or taken[label] < self._quota[label]):
                    taken[label] += 1
                    yield name, label, read(), weight
                    if taken == self._quota:  # every share is full: the rest of the stream is not needed
                        return
        except (tarfile.TarError, EOFError) as e:  # the stream's next header, or a member's data, is cut short
            raise ConversionError(f"SRC {self.src}: truncated or damaged tar archive ({e})") from None

    def _entries(self) -> Iterator[tuple[str, Callable[[], str | bytes], int]]:
        """(name, a function that returns its path or bytes, progress weight) of each image, in order."""
        if self.src.is_dir():
            for name, path in self._files:
                yield name, (lambda path=path: path), 1
            return
        position = 0
        for m in self._tar:
            weight, position = self._raw.tell() - position, self._raw.tell()
            if m.isfile() and m.name.endswith(".tar"):
                self.skipped.append({"path": m.name, "reason": "a class archive: convert it without --labels"})
            elif m.isfile() and not _hidden(m.name):
                yield m.name, (lambda m=m: self._tar.extractfile(m).read()), weight
            elif m.isfile():
                self.skipped.append({"path": m.name, "reason": "in a hidden folder"})
            elif not m.isdir():
                self.skipped.append({"path": m.name, "reason": "not a regular file"})

    def close(self) -> None:
        if not self.src.is_dir():
            self._tar.close()
            self._raw.close()
