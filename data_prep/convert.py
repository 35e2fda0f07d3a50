"""`convert SRC DST.beton`: an ImageFolder tree -> a .beton of JPEGs and labels, with its class list and report.

    SRC/<class>/<image>  ->  DST.beton          images (RGB JPEG, longer side <= max_resolution) and labels
                             DST.classes.json   class folder names, sorted: label = index
                             DST.report.json    every skipped file with its reason, every converted one, counts

Each file is read and decoded once, in a pool of worker processes (`images.encode_image`); the main process
writes the results in file order (`writer.BetonWriter`), so the output is deterministic and a bad file simply
never gets in. The .beton is written under a temporary name beside DST and renamed at the very end: an error
or an interruption (Ctrl-C, SIGTERM) leaves neither DST nor the temporary file.
"""

import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import PrepError
from data_prep.folder import FolderScan, rel_path, scan_image_folder, take_evenly
from data_prep.images import encode_image
from data_prep.writer import BetonWriter, page_size_for
from mugs_fast.data.beton import sidecar_path


class ConversionError(PrepError):
    """A conversion that cannot start or produced nothing: bad arguments, paths or input."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread during a conversion so that it cleans up as for Ctrl-C."""


@dataclass
class ConversionSummary:
    dst: Path
    written: int
    skipped: int  # files and folders that are not (decodable) images
    bytes: int  # size of the .beton
    seconds: float
    images_per_s: float  # written / seconds, scan included
    num_classes: int
    converted: int  # kept after conversion to RGB from another format or mode
    images_per_class: dict[str, int]
    empty_classes: list[str]  # classes without any image in the .beton
    report: Path

    def __str__(self) -> str:
        empty = ""
        if self.empty_classes:
            names = ", ".join(self.empty_classes[:5]) + (", ..." if len(self.empty_classes) > 5 else "")
            empty = f"; {len(self.empty_classes)} classes without images ({names})"
        return (
            f"wrote {self.written:,} images of {self.num_classes} classes ({self.bytes / 1e6:,.1f} MB) to "
            f"{self.dst} in {self.seconds:.1f} s ({self.images_per_s:,.0f} images/s); skipped {self.skipped:,} "
            f"files, converted {self.converted:,} to RGB{empty}; report: {self.report}"
        )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    workers: int | None = None,
    limit: int | None = None,
    classes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Converts the ImageFolder tree `src` into the .beton `dst` (see the module docstring).

    workers: processes (default: all available cores). limit: at most this many files, spread evenly over
    the classes. classes: only the first N class folders. Raises ConversionError (one-line message) for bad
    arguments or paths, an existing dst without overwrite, or a src without (decodable) images.
    """
    src, dst = Path(src), Path(dst)
    _check_arguments(src, dst, max_resolution, jpeg_quality, workers, limit, classes, overwrite)
    settings = dict(
        src=str(src), max_resolution=max_resolution, jpeg_quality=jpeg_quality, limit=limit, classes=classes
    )
    workers = workers or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    scan = _scan(src, classes, limit)

    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    try:
        with _sigterm_raises(), BetonWriter(tmp, len(scan.samples), page_size_for(max_resolution)) as writer:
            converted = _encode_all(scan, src, writer, max_resolution, jpeg_quality, workers, progress)
            size = writer.finish() if writer.count else 0
        summary = _summarize(dst, writer, scan, len(converted), size, time.perf_counter() - start)
        report = {
            **_jsonable(asdict(summary)),
            "settings": settings,
            "skipped_files": scan.skipped,
            "converted_files": converted,
        }
        _write_json(summary.report, report)
        if not writer.count:
            raise ConversionError(f"none of the {len(scan.samples)} files could be decoded: see {summary.report}")
        _write_json(sidecar_path(dst, "classes"), scan.classes)
        os.replace(tmp, dst)  # last: DST exists only complete, with its class list and report beside it
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def _check_arguments(src, dst, max_resolution, jpeg_quality, workers, limit, classes, overwrite) -> None:
    if not src.exists():
        raise ConversionError(f"SRC {src} does not exist")
    if not src.is_dir():
        raise ConversionError(f"SRC {src} is not a folder")
    if not dst.parent.is_dir():
        raise ConversionError(f"cannot write {dst}: folder {dst.parent} does not exist")
    if dst.is_dir():
        raise ConversionError(f"DST {dst} is a folder: give a file name such as {dst / 'train.beton'}")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists: kept as it is (use --overwrite to replace it)")
    if not 1 <= max_resolution <= 65535:  # the .beton stores width and height as uint16
        raise ConversionError(f"max resolution must be in 1..65535, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ConversionError(f"JPEG quality must be in 1..100, got {jpeg_quality}")
    for name, value in (("workers", workers), ("limit", limit), ("classes", classes)):
        if value is not None and value < 1:
            raise ConversionError(f"{name} must be >= 1, got {value}")


def _scan(src: Path, classes: int | None, limit: int | None) -> FolderScan:
    try:
        scan = scan_image_folder(src, classes)
    except OSError as e:
        raise ConversionError(f"cannot read SRC {src}: {e.strerror}") from None
    if not scan.classes:
        raise ConversionError(f"no class folders in {src}: expected the ImageFolder layout SRC/<class>/<image>")
    if classes is not None and len(scan.classes) < classes:
        raise ConversionError(f"asked for {classes} classes but {src} has {len(scan.classes)} class folders")
    if not scan.samples:
        raise ConversionError(f"no images in the {len(scan.classes)} class folders of {src}")
    if limit is not None:
        scan.samples = take_evenly(scan.samples, len(scan.classes), limit)
    return scan


def _encode_all(scan, src, writer, max_resolution, jpeg_quality, workers, progress) -> list[dict]:
    """Encodes the files in a worker pool and appends them to `writer` in order. Adds the undecodable files to
    scan.skipped; returns the files kept after conversion from another format or mode."""
    encode = partial(_encode_chunk, max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    paths = [path for path, _ in scan.samples]
    per_chunk = max(1, min(64, len(paths) // (8 * workers)))  # >= 8 chunks per worker: balanced to the end
    chunks = [paths[i : i + per_chunk] for i in range(0, len(paths), per_chunk)]
    started = multiprocessing.Value("i", 0)  # workers ever started: more than `workers` = one died
    converted = []
    # the pool exists before the progress bar's thread (forking a threaded process is fragile); leaving the
    # `with` block terminates the workers, also on an error or an interruption
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(started,)) as pool:
        results = itertools.chain.from_iterable(_watch(pool.imap(encode, chunks), started, workers))
        with tqdm(total=len(paths), unit=" images", desc="convert", disable=not progress, smoothing=0.05) as bar:
            for (path, label), result in zip(scan.samples, results, strict=True):
                if isinstance(result, str):
                    scan.skipped.append({"path": rel_path(path, src), "reason": result})
                    bar.set_postfix_str(f"skipped {len(scan.skipped)}", refresh=False)
                else:
                    writer.add(result.jpeg, result.height, result.width, label)
                    if result.source:
                        converted.append({"path": rel_path(path, src), "source": result.source})
                bar.update()
    return converted


def _encode_chunk(paths: list[str], max_resolution: int, jpeg_quality: int) -> list:
    return [encode_image(path, max_resolution, jpeg_quality) for path in paths]


def _watch(results, started, workers: int, poll_s: float = 2.0):
    """The results of `pool.imap` (chunksize 1), in order. A worker that dies (killed, out of memory, crashed)
    takes its task with it and the pool would wait for that result forever: raise instead."""
    while True:
        try:
            yield results.next(timeout=poll_s)
        except StopIteration:
            return
        except multiprocessing.TimeoutError:
            if started.value > workers:  # the pool replaced a worker: a task is lost
                raise ConversionError("a worker process died (killed? out of memory?): nothing written") from None


def _init_worker(started) -> None:
    with started.get_lock():
        started.value += 1
    # Ctrl-C reaches the whole process group: the main process handles it and terminates the workers, with
    # SIGTERM, which must kill them at once (not raise Terminated, whose handler they inherit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated in the main thread for the duration (as Ctrl-C raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summarize(dst, writer, scan, converted, size, seconds) -> ConversionSummary:
    per_class = dict(zip(scan.classes, np.bincount(writer.labels, minlength=len(scan.classes)).tolist(), strict=True))
    return ConversionSummary(
        dst=dst,
        written=writer.count,
        skipped=len(scan.skipped),
        bytes=size,
        seconds=seconds,
        images_per_s=writer.count / seconds,
        num_classes=len(scan.classes),
        converted=converted,
        images_per_class=per_class,
        empty_classes=[name for name, n in per_class.items() if n == 0],
        report=sidecar_path(dst, "report"),
    )


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an ImageFolder tree (SRC/<class>/<image>) into a .beton",
        description="Convert an ImageFolder tree (SRC/<class>/<image>) into a .beton of JPEGs and labels, with "
        "DST.classes.json and DST.report.json (skipped and converted files) beside it.",
    )
    p.add_argument("src", metavar="SRC", help="image folder: one sub-folder per class")
    p.add_argument("dst", metavar="DST.beton", help="output file")
    p.add_argument("--max-resolution", type=int, default=512, metavar="PX", help="longer side at most PX (512)")
    p.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality of the stored images (90)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images, spread over the classes")
    p.add_argument("--classes", type=int, default=None, metavar="N", help="only the first N class folders (sorted)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run)


def _run(args) -> int:
    options = ("max_resolution", "jpeg_quality", "workers", "limit", "classes", "overwrite", "progress")
    summary = convert(args.src, args.dst, **{name: getattr(args, name) for name in options})
    print(summary)
    return 0
