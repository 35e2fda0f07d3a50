"""`convert SRC DST.beton`: images and labels -> a .beton of JPEGs and labels, with its class list and report.

    SRC/<class>/<image>           ->  DST.beton               images (JPEG, longer side <= max_resolution), labels
    ILSVRC2012_img_train.tar          DST.beton.classes.json  class names, sorted: label = index
    ILSVRC2012_img_val.tar --labels   DST.beton.report.json   every skipped file with its reason, counts, settings

One process reads the source (sources.py: a folder's file list, or an archive streamed front to back) and hands
its images, in chunks, to a pool of worker processes (`images.encode_image`: the original JPEG bytes where
they can serve, else a re-encoded JPEG); the main process writes the results in source order
(`writer.BetonWriter`), so the output is deterministic and a bad file simply never gets in. At most a few
chunks per worker are in flight: memory stays flat however large the archive. The .beton and its side files
are written under temporary names beside DST and renamed at the very end, the .beton first and the report
last: an error or an interruption (Ctrl-C, SIGTERM) leaves neither DST nor a temporary file, and a report
exists only for a conversion that completed (or for one that decoded nothing, to say why). Temporaries that a
killed conversion (kill -9) left are removed by the next one.
"""

import json
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import int_in
from data_prep.images import encode_image
from data_prep.sources import ConversionError, Source, open_source
from data_prep.writer import MAX_RESOLUTION, BetonWriter, page_size_for
from mugs_fast.data.beton import sidecar_path
from mugs_fast.files import atomic_path, atomic_paths, remove_stale_temporaries

__all__ = ["ConversionError", "ConversionSummary", "convert"]


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
    stored_as_is: int  # original JPEG bytes, unchanged
    reencoded: dict[str, int]  # why the others were re-encoded -> how many
    images_per_class: dict[str, int]
    empty_classes: list[str]  # classes without any image in the .beton
    report: Path

    def __str__(self) -> str:
        empty = ""
        if self.empty_classes:
            names = ", ".join(self.empty_classes[:5]) + (", ..." if len(self.empty_classes) > 5 else "")
            empty = f"; {len(self.empty_classes)} classes without images ({names})"
        why = ", ".join(f"{reason}: {n:,}" for reason, n in self.reencoded.items())
        return (
            f"wrote {self.written:,} images of {self.num_classes} classes ({self.bytes / 1e6:,.1f} MB) to "
            f"{self.dst} in {self.seconds:.1f} s ({self.images_per_s:,.0f} images/s): {self.stored_as_is:,} "
            f"stored as they were, {sum(self.reencoded.values()):,} re-encoded{f' ({why})' if why else ''}; "
            f"skipped {self.skipped:,} files, converted {self.converted:,} to RGB{empty}; report: {self.report}"
        )


@dataclass
class _Tally:
    """What happened to the images that were written."""

    labels: list[int] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)  # {"path", "source"} of non-RGB-JPEG sources
    reencoded: Counter = field(default_factory=Counter)  # reason -> count
    failed: int = 0  # images that did not decode (skipped)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    workers: int | None = None,
    limit: int | None = None,
    classes: int | None = None,
    labels: str | os.PathLike | None = None,
    classes_from: str | os.PathLike | None = None,
    reencode: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Converts `src` (an ImageFolder tree, an archive of class archives, or a flat archive or folder with
    `labels`) into the .beton `dst` (see the module docstring and sources.py).

    workers: processes (default: all available cores). limit: at most this many images, spread evenly over
    the classes. classes: only the first N classes. classes_from: the class list of a flat source (train's
    `.classes.json`). reencode: never store the original bytes. Raises ConversionError (one-line message) for
    bad arguments or paths, an existing dst without overwrite, or a src without (decodable) images.
    """
    src, dst = Path(src), Path(dst)
    _check_arguments(dst, max_resolution, jpeg_quality, workers, limit, classes, overwrite)
    settings = dict(
        src=str(src),
        max_resolution=max_resolution,
        jpeg_quality=jpeg_quality,
        limit=limit,
        classes=classes,
        labels=labels and str(labels),
        classes_from=classes_from and str(classes_from),
        reencode=reencode,
    )
    workers = workers or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    source = open_source(src, classes=classes, limit=limit, labels=labels, classes_from=classes_from)

    # DST first and the report last: a report means that DST is complete
    outputs = [dst, sidecar_path(dst, "classes"), sidecar_path(dst, "report")]
    remove_stale_temporaries(dst.parent, *(glob_escape(path.name) for path in outputs))  # of killed conversions
    page_size = page_size_for(max_resolution)
    encode = partial(
        _encode_chunk, max_resolution=max_resolution, jpeg_quality=jpeg_quality, reencode=reencode, max_bytes=page_size
    )
    with atomic_paths(outputs) as (beton_tmp, classes_tmp, report_tmp):
        with source, _sigterm_raises(), BetonWriter(beton_tmp, 0, page_size) as writer:
            tally = _encode_all(source, writer, encode, workers, progress)
            size = writer.finish() if writer.count else 0
        summary = _summarize(dst, source, tally, size, time.perf_counter() - start)
        report = {**_jsonable(asdict(summary)), "settings": settings, "skipped_files": source.skipped}
        report["converted_files"] = tally.converted
        if not writer.count:  # no DST (the error removes the temporaries): the report, written apart, says why
            _write_json(summary.report, report)
            found = f"none of the {tally.failed} files could be decoded" if tally.failed else f"no images in {src}"
            raise ConversionError(f"{found}: see {summary.report}")
        _write_json(classes_tmp, source.classes, atomic=False)
        _write_json(report_tmp, report, atomic=False)
    return summary


def _check_arguments(dst, max_resolution, jpeg_quality, workers, limit, classes, overwrite) -> None:
    if not dst.parent.is_dir():
        raise ConversionError(f"cannot write {dst}: folder {dst.parent} does not exist")
    if dst.is_dir():
        raise ConversionError(f"DST {dst} is a folder: give a file name such as {dst / 'train.beton'}")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists: kept as it is (use --overwrite to replace it)")
    if not 1 <= max_resolution <= MAX_RESOLUTION:  # the writer's page must hold an image (writer.page_size_for)
        raise ConversionError(f"max resolution must be in 1..{MAX_RESOLUTION}, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ConversionError(f"JPEG quality must be in 1..100, got {jpeg_quality}")
    for name, value in (("workers", workers), ("limit", limit), ("classes", classes)):
        if value is not None and value < 1:
            raise ConversionError(f"{name} must be >= 1, got {value}")


def _encode_all(source: Source, writer: BetonWriter, encode, workers: int, progress: bool) -> _Tally:
    """Encodes the source's images in a worker pool and appends them to `writer` in source order; adds the
    undecodable ones to source.skipped."""
    per_chunk = source.chunk_size or max(1, min(64, source.total // (8 * workers)))  # >= 8 per worker: balanced
    max_pending = max(4 * workers, source.in_flight // per_chunk)
    started = multiprocessing.Value("i", 0)  # workers ever started: more than `workers` = one died
    stopping = multiprocessing.Value("b", 0)  # set before the pool terminates its workers (see _init_worker)
    tally = _Tally()
    pending = deque()  # (items, result) in source order; a bounded window, so a stream is read as it is used
    # the pool exists before the progress bar's thread (forking a threaded process is fragile); leaving the
    # `with` block terminates the workers, also on an error or an interruption
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(started, stopping)) as pool:
        bar_options = dict(unit_scale=source.unit == "B", unit_divisor=1024 if source.unit == "B" else 1000)
        try:
            with tqdm(
                total=source.total,
                unit=source.unit,
                desc="convert",
                disable=not progress,
                smoothing=0.05,
                **bar_options,
            ) as bar:
                for chunk in _chunks(source.items(), per_chunk):
                    pending.append((chunk, pool.apply_async(encode, ([data for _, _, data, _ in chunk],))))
                    if len(pending) >= max_pending:
                        _store(*pending.popleft(), writer, source, tally, bar, started, workers)
                while pending:
                    _store(*pending.popleft(), writer, source, tally, bar, started, workers)
                bar.update(max(0, source.total - bar.n))
        finally:
            stopping.value = 1  # before the pool's terminate() at the end of the `with`
    return tally


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _store(chunk, result, writer, source, tally, bar, started, workers) -> None:
    """Writes one chunk's encoded images (waiting for them), or records why they were skipped."""
    for (name, label, _, _), encoded in zip(chunk, _wait(result, started, workers), strict=True):
        if isinstance(encoded, str):
            source.skipped.append({"path": name, "reason": encoded})
            tally.failed += 1
            continue
        writer.add(encoded.jpeg, encoded.height, encoded.width, label)
        tally.labels.append(label)
        if encoded.source:
            tally.converted.append({"path": name, "source": encoded.source})
        if encoded.reencoded:
            tally.reencoded[encoded.reencoded] += 1
    bar.update(sum(weight for *_, weight in chunk))
    images = f"{writer.count:,} images, " if source.unit == "B" else ""
    bar.set_postfix_str(f"{images}skipped {len(source.skipped):,}", refresh=False)


def _encode_chunk(items: list, **options) -> list:
    return [encode_image(item, **options) for item in items]


def _wait(result, started, workers: int, poll_s: float = 2.0):
    """The value of an `apply_async` result. A worker that dies (killed, out of memory, crashed) takes its task
    with it and the pool would wait for that result forever: raise instead."""
    while True:
        try:
            return result.get(timeout=poll_s)
        except multiprocessing.TimeoutError:
            if started.value > workers:  # the pool replaced a worker: a task is lost
                raise ConversionError("a worker process died (killed? out of memory?): nothing written") from None


def _init_worker(started, stopping) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it and terminates the workers, with
    # SIGTERM, which must kill them at once (not raise Terminated, whose handler they inherit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A SIGTERM that reaches a worker between its fork and Python's after-fork set-up is lost (Python clears
    # the signals it had noted), and the worker would then wait for tasks forever while the pool joins it. The
    # main process sets `stopping` before it terminates the pool, so a worker that starts after that leaves now;
    # one that read it earlier has SIGTERM at its default already, and dies of it.
    if stopping.value:
        os._exit(0)
    with started.get_lock():
        started.value += 1


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


def _summarize(dst, source: Source, tally: _Tally, size: int, seconds: float) -> ConversionSummary:
    counts = np.bincount(np.asarray(tally.labels, dtype=np.int64), minlength=len(source.classes)).tolist()
    per_class = dict(zip(source.classes, counts, strict=True))
    return ConversionSummary(
        dst=dst,
        written=len(tally.labels),
        skipped=len(source.skipped),
        bytes=size,
        seconds=seconds,
        images_per_s=len(tally.labels) / seconds,
        num_classes=len(source.classes),
        converted=len(tally.converted),
        stored_as_is=len(tally.labels) - sum(tally.reencoded.values()),
        reencoded=dict(tally.reencoded.most_common()),
        images_per_class=per_class,
        empty_classes=[name for name, n in per_class.items() if n == 0],
        report=sidecar_path(dst, "report"),
    )


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _write_json(path: Path, obj, atomic: bool = True) -> None:
    """Writes `obj` as JSON to `path`; atomic: through a temporary file (never a half-written `path`)."""
    if not atomic:
        path.write_text(json.dumps(obj, indent=1) + "\n")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an image folder or ImageNet's archives into a .beton",
        description="Convert an ImageFolder tree (SRC/<class>/<image>), a tar of class tars "
        "(ILSVRC2012_img_train.tar), or a flat tar or folder of images with --labels (ILSVRC2012_img_val.tar) "
        "into a .beton of JPEGs and labels, with DST.beton.classes.json and DST.beton.report.json beside it.",
    )
    p.add_argument("src", metavar="SRC", help="image folder, class-archive tar, or flat tar/folder with --labels")
    p.add_argument("dst", metavar="DST.beton", help="output file")
    p.add_argument(
        "--max-resolution",
        type=int_in(1, MAX_RESOLUTION),
        default=512,
        metavar="PX",
        help=f"longer side at most PX, 1..{MAX_RESOLUTION} (512)",
    )
    p.add_argument("--jpeg-quality", type=int_in(1, 100), default=90, metavar="Q", help="JPEG quality, 1..100 (90)")
    p.add_argument("--workers", type=int_in(1, 1024), default=None, metavar="N", help="processes (default: all cores)")
    p.add_argument("--limit", type=int_in(1), default=None, metavar="N", help="at most N images, spread over classes")
    p.add_argument("--classes", type=int_in(1), default=None, metavar="N", help="only the first N classes")
    p.add_argument(
        "--labels",
        metavar="FILE",
        default=None,
        help="labels of a flat SRC: ILSVRC2012_devkit_t12.tar.gz, LOC_val_solution.csv or 'filename synset' lines",
    )
    p.add_argument(
        "--classes-from",
        "--classes_from",
        dest="classes_from",
        metavar="CLASSES.json",
        default=None,
        help="the class list of a --labels conversion, e.g. train.beton.classes.json (default: the labels' synsets)",
    )
    p.add_argument("--reencode", action="store_true", help="re-encode every image (never store the original bytes)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run)


def _run(args) -> int:
    options = ("max_resolution", "jpeg_quality", "workers", "limit", "classes", "labels", "classes_from")
    options += ("reencode", "overwrite", "progress")
    summary = convert(args.src, args.dst, **{name: getattr(args, name) for name in options})
    print(summary)
    return 0
