"""`inspect FILE.beton`: what a .beton holds (samples, classes, resolutions, sizes) and a contact sheet of it."""

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep import PrepError, int_in
from mugs_fast.data.beton import BetonReader, sidecar_path


def _describe(values: np.ndarray) -> dict:
    if not len(values):
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {
        "min": int(values.min()),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "max": int(values.max()),
    }


def beton_stats(reader: BetonReader) -> dict:
    """Sample count, classes with per-class counts, height/width/longer-side and JPEG byte-size statistics."""
    names = reader.classes or [str(i) for i in range(reader.num_classes)]
    counts = np.bincount(reader.labels, minlength=len(names))
    return {
        "file": str(reader.path),
        "file_bytes": reader.path.stat().st_size,
        "samples": len(reader),
        "classes": len(names),
        "class_list": str(sidecar_path(reader.path, "classes")) if reader.classes else None,
        "per_class": dict(zip(names, counts.tolist(), strict=True)),
        "height": _describe(reader.heights),
        "width": _describe(reader.widths),
        "longer_side": _describe(np.maximum(reader.heights, reader.widths)),
        "jpeg_bytes": {**_describe(reader.sizes), "total": int(reader.sizes.sum())},
    }


def format_stats(stats: dict, max_classes_listed: int = 20) -> str:
    """A few lines of text: totals, per-class counts (listed when there are few classes), size statistics."""

    def line(name: str, d: dict, unit: str) -> str:
        return f"{name:<12} min {d['min']:,}{unit}  mean {d['mean']:,.0f}{unit}  max {d['max']:,}{unit}"

    counts = np.array(list(stats["per_class"].values()))
    jpeg = stats["jpeg_bytes"]
    out = [
        f"{stats['file']}: {stats['samples']:,} samples, {stats['classes']:,} classes, "
        f"{stats['file_bytes'] / 1e6:,.1f} MB (class list: {stats['class_list'] or 'absent'})",
    ]
    if len(counts):
        out.append(f"{'per class':<12} min {counts.min():,}  mean {counts.mean():,.1f}  max {counts.max():,}")
    if len(counts) <= max_classes_listed:
        out += [f"  {label:>4}  {name:<24} {n:>8,}" for label, (name, n) in enumerate(stats["per_class"].items())]
    out += [
        line("height", stats["height"], " px"),
        line("width", stats["width"], " px"),
        line("longer side", stats["longer_side"], " px"),
        line("JPEG size", jpeg, " B") + f"  median {jpeg['median']:,.0f} B  total {jpeg['total'] / 1e6:,.1f} MB",
    ]
    return "\n".join(out)


def contact_sheet(
    reader: BetonReader, out: str | os.PathLike, samples: int = 64, tile: int = 128, seed: int = 0
) -> int:
    """Writes a PNG grid of `samples` random images (sorted by label), each captioned 'label: class'.

    Returns the number of samples that could not be decoded (drawn as a red tile)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(reader), size=min(samples, len(reader)), replace=False)
    picks = picks[np.argsort(reader.labels[picks], kind="stable")]
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    caption = 14
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    failed = 0
    for k, i in enumerate(picks):
        jpeg, label = reader[int(i)]
        x, y = (k % cols) * tile, (k // cols) * (tile + caption)
        try:
            img = Image.open(io.BytesIO(jpeg.tobytes()))
            img.thumbnail((tile - 2, tile - 2))
            sheet.paste(img.convert("RGB"), (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        except Exception:  # a stored JPEG that does not decode: show it, do not stop
            failed += 1
            draw.rectangle((x + 1, y + 1, x + tile - 2, y + tile - 2), fill=(200, 0, 0))
        name = reader.classes[label] if reader.classes else str(label)
        draw.text((x + 2, y + tile), f"{label}: {name}"[: tile // 6], fill="black", font=font)
    sheet.save(out)
    return failed


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="statistics and a contact sheet of a .beton",
        description="Sample count, classes and per-class counts, resolution and JPEG size statistics of a .beton.",
    )
    p.add_argument("file", metavar="FILE.beton")
    p.add_argument("--sheet", metavar="OUT.png", default=None, help="write a contact sheet of decoded samples")
    p.add_argument("--samples", type=int_in(1), default=64, metavar="N", help="images on the sheet, >= 1 (64)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(run=_run)


def _run(args) -> int:
    reader = BetonReader(args.file)
    stats = beton_stats(reader)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    if args.sheet and len(reader):
        failed = contact_sheet(reader, Path(args.sheet), samples=args.samples)
        print(f"contact sheet: {args.sheet}")
        if failed:
            raise PrepError(f"{failed} of the sampled images in {args.file} do not decode (red tiles on the sheet)")
    return 0
