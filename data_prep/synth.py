"""`synth DST_DIR`: the built-in dataset, DST_DIR/{train,val}/<class>/<image>.jpg, deterministic from a seed.

Each class is a texture pattern (stripes, checkers, dots, rings, ...) filling a large random shape or the whole
image, with periods of 1/9 to 1/4 of the image side: coarse enough that a crop of a quarter of the image, at
32 px, still shows the pattern. Everything else is random and drawn the same way for every class: the
pattern's tilt (within `max_tilt` degrees of upright, 20 by default), period and offset, the shape, the colours,
the noise, the image size. The patterns stand near upright, as most photographed things do, because the
multi-crop augmentations flip and crop but never rotate: classes seen at every angle (stripes, zigzags and waves
at any angle share most local edges) ask a small network for a rotation invariance nothing teaches it. Measured on
the demo's network (README, "What the demo does"): supervised training of it for 279 steps reached 62 %
top-1 with patterns at any angle, 76 % within 20 degrees of upright. The colours are
smooth random fields (a dark one and a light one for the pattern, a third for the background), so they change
across an image: colour tells neither the class nor, reliably, which image a crop came from; the pattern's
geometry does, which a network has to learn. The dark/light split keeps every image high-contrast.
"""

import ctypes
import ctypes.util
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import PrepError, int_in

TAU = 2 * np.pi
SPLITS = ("train", "val")


def _soft(x: np.ndarray, edge: float) -> np.ndarray:
    """0 below -edge/2, 1 above +edge/2, linear in between: anti-aliased thresholding at 0."""
    return np.clip(0.5 + x / edge, 0.0, 1.0)


def _cell(u: np.ndarray, v: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Position inside the lattice cell of period p, in cell units, centred: [-0.5, 0.5)."""
    return u / p - np.round(u / p), v / p - np.round(v / p)


def _stripes(u, v, p, rng):
    return _soft(np.sin(TAU * u / p), 0.4)


def _checkers(u, v, p, rng):
    return _soft(np.sin(TAU * u / p) * np.sin(TAU * v / p), 0.2)


def _dots(u, v, p, rng):
    fu, fv = _cell(u, v, p)
    return _soft(0.28 - np.hypot(fu, fv), 2 / p)


def _rings(u, v, p, rng):
    return _soft(np.sin(TAU * np.hypot(u, v) / p), 0.4)


def _zigzag(u, v, p, rng):
    tri = np.abs(v / (2 * p) - np.round(v / (2 * p)))  # triangle wave in [0, 0.5], period 2p
    return _soft(np.sin(TAU * (u + 1.6 * p * tri) / p), 0.4)


def _grid(u, v, p, rng):
    fu, fv = _cell(u, v, p)
    return _soft(np.maximum(np.abs(fu), np.abs(fv)) - 0.38, 2 / p)  # thin lines on the cell borders


def _spokes(u, v, p, rng):
    return _soft(np.sin(int(rng.integers(5, 10)) * np.arctan2(v, u)), 0.4)


def _waves(u, v, p, rng):
    return _soft(np.sin(TAU * (u + 0.45 * p * np.sin(TAU * v / (2.5 * p))) / p), 0.4)


def _spots(u, v, p, rng):
    h, w = u.shape
    coarse = rng.standard_normal((max(2, int(h / p) + 2), max(2, int(w / p) + 2))).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    return _soft(field - 0.3, 0.3)


def _crosses(u, v, p, rng):
    fu, fv = np.abs(_cell(u, v, p)[0]), np.abs(_cell(u, v, p)[1])
    bar = lambda a, b: np.minimum(_soft(0.09 - a, 2 / p), _soft(0.33 - b, 2 / p))
    return np.maximum(bar(fu, fv), bar(fv, fu))


PATTERNS = {
    "stripes": _stripes,
    "checkers": _checkers,
    "dots": _dots,
    "rings": _rings,
    "zigzag": _zigzag,
    "grid": _grid,
    "spokes": _spokes,
    "waves": _waves,
    "spots": _spots,
    "crosses": _crosses,
}


def class_names(num_classes: int) -> list[str]:
    """Folder names '00_stripes', '01_checkers', ...: sorted order = label order."""
    return [f"{i:02d}_{name}" for i, name in enumerate(list(PATTERNS)[:num_classes])]


def _colour_field(rng: np.random.Generator, h: int, w: int, low: float, high: float) -> np.ndarray:
    """(3, H, W) float32 colours, each channel uniform in [low, high) on a random 3x3 grid, smoothly upsampled."""
    grid = rng.uniform(low, high, size=(3, 3, 3)).astype(np.float32)  # (channel, gy, gx)
    return np.stack([np.asarray(Image.fromarray(g).resize((w, h), Image.Resampling.BILINEAR)) for g in grid])


def render(rng: np.random.Generator, label: int, min_size: int, max_size: int, max_tilt: float = 20.0) -> np.ndarray:
    """One (H, W, 3) uint8 image of class `label`; H and W uniform in [min_size, max_size], the pattern tilted
    by an angle uniform in [-max_tilt, max_tilt] degrees (180: any orientation).

    The pattern of the class fills a large random shape (or the whole image): periods of 1/9 to 1/4 of the
    image side, so a crop of a quarter of the image still shows a few of them at 32 px. Its two colours are
    a dark and a light smooth random colour field (3x3 control points each), so the colour changes across the
    image and two crops of one image need not share a colour: what they share is the pattern's geometry. The
    background outside the shape is a third, mid-grey-centred colour field. float32 throughout, colour
    planes channel-first: a few ms of one core for a 192-px image.
    """
    h, w = (int(s) for s in rng.integers(min_size, max_size + 1, size=2))
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)  # (H, 1), (W,)
    angle = np.radians(rng.uniform(-max_tilt, max_tilt))
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    u = (x - cx) * cos + (y - cy) * sin  # (H, W) pattern coordinates: centred on (cx, cy), rotated
    v = (y - cy) * cos - (x - cx) * sin
    period = rng.uniform(0.11, 0.25) * min(h, w)
    pattern = list(PATTERNS.values())[label](u, v, period, rng)

    a, b = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h  # the shape's half-extents: most of the image
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        mask = _soft(1 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2, 0.1)
    elif kind == 1:  # rectangle, rotated with the pattern
        mask = _soft(1 - np.maximum(np.abs(u) / a, np.abs(v) / b), 0.05)
    else:  # the whole image
        mask = np.ones_like(u)

    # dark and light fields at least 40 apart in every channel: the pattern never fades into its background
    dark, light = _colour_field(rng, h, w, 0, 105), _colour_field(rng, h, w, 145, 255)
    c1, c2 = (dark, light) if rng.random() < 0.5 else (light, dark)
    img = _colour_field(rng, h, w, 40, 215)  # (3, H, W) background
    fill = c1 + (c2 - c1) * pattern
    fill -= img
    fill *= mask
    img += fill  # background where mask = 0, pattern where mask = 1
    img += rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(0, 10)
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (H, W, 3)


@dataclass
class SynthDataset:
    root: Path
    classes: list[str]
    num_train: int
    num_val: int
    seconds: float

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        return self.root / "val"

    def __str__(self) -> str:
        return (
            f"wrote {self.num_train:,} train and {self.num_val:,} val images of {len(self.classes)} classes "
            f"to {self.root} in {self.seconds:.1f} s"
        )


def _keep_freed_memory() -> None:
    """Pool initializer: keep glibc from handing each freed image-sized buffer back to the OS, only to
    page-fault it in again for the next image (a third of the CPU time of `render`). No-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


def _write_class(job: tuple) -> None:
    folder, split, label, count, seed, min_size, max_size, max_tilt = job
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), label, i])  # per image: any worker order
        img = render(rng, label, min_size, max_size, max_tilt)
        Image.fromarray(img).save(folder / f"{split}_{label:02d}_{i:05d}.jpg", quality=90)


def write_dataset(
    dst_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_classes: int = 10,
    train_per_class: int = 300,
    val_per_class: int = 50,
    min_size: int = 128,
    max_size: int = 256,
    max_tilt: float = 20.0,
    workers: int | None = None,
    overwrite: bool = False,
) -> SynthDataset:
    """Writes dst_dir/train and dst_dir/val (ImageFolder trees of JPEGs); the same bytes for the same arguments.

    Raises PrepError for bad sizes or when dst_dir already holds train/ or val/ (unless overwrite: replaced).
    """
    root = Path(dst_dir)
    if not 1 <= num_classes <= len(PATTERNS):
        raise PrepError(f"num_classes must be in 1..{len(PATTERNS)}, got {num_classes}")
    if not 8 <= min_size <= max_size:
        raise PrepError(f"need 8 <= min_size <= max_size, got {min_size} and {max_size}")
    if train_per_class < 0 or val_per_class < 0:
        raise PrepError("images per class must be >= 0")
    if not 0 <= max_tilt <= 180:
        raise PrepError(f"max_tilt must be in 0..180 degrees, got {max_tilt}")
    for split in SPLITS:
        if (root / split).exists():
            if not overwrite:
                raise PrepError(f"{root / split} exists (use --overwrite to replace it)")
            shutil.rmtree(root / split)

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": train_per_class, "val": val_per_class}
    classes = class_names(num_classes)
    jobs = [
        (root / split / name, split, label, counts[split], seed, min_size, max_size, max_tilt)
        for split in SPLITS
        for label, name in enumerate(classes)
    ]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    with multiprocessing.Pool(workers, initializer=_keep_freed_memory) as pool:
        pool.map(_write_class, jobs, chunksize=1)
    seconds = time.perf_counter() - start
    return SynthDataset(root, classes, train_per_class * num_classes, val_per_class * num_classes, seconds)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write the built-in dataset (train/ and val/ image folders)",
        description="Write the built-in dataset: DST_DIR/{train,val}/<class>/*.jpg, textured shapes, one texture "
        "per class, deterministic from --seed.",
    )
    p.add_argument("dst_dir", metavar="DST_DIR", help="writes DST_DIR/train and DST_DIR/val")
    p.add_argument("--seed", type=int_in(0), default=0, help="same seed, same images (default 0)")
    p.add_argument("--num-classes", type=int_in(1, len(PATTERNS)), default=10, help=f"1..{len(PATTERNS)} (10)")
    p.add_argument("--train-per-class", type=int_in(0), default=300, help="train images per class (default 300)")
    p.add_argument("--val-per-class", type=int_in(0), default=50, help="val images per class (default 50)")
    p.add_argument("--min-size", type=int_in(8), default=128, help="smallest image side, px (default 128)")
    p.add_argument("--max-size", type=int_in(8), default=256, help="largest image side, px (default 256)")
    p.add_argument("--max-tilt", type=int_in(0, 180), default=20, help="largest tilt of the patterns, degrees (20)")
    p.add_argument("--workers", type=int_in(1, 1024), default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing train/ and val/ folders")
    p.set_defaults(run=_run)


def _run(args) -> int:
    options = vars(args).copy()
    for name in ("run", "command", "dst_dir"):
        options.pop(name)
    print(write_dataset(args.dst_dir, **options))
    return 0
