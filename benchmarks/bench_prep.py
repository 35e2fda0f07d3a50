"""Conversion speed of `data_prep.convert` on an ImageNet-like mix, from a folder and from a train-style archive,
for 1 and N worker processes, against ffcv's DatasetWriter.

    python benchmarks/bench_prep.py [--images 480] [--workers 1 2] [--repeats 2] [--large-share 0.1] [--ffcv]

Generates the input on the fly (photo-like content, JPEG quality 95: ~110 KB on average, as ImageNet's train
set; 90% of the images 360-440 x 300-400 px, within the default 512 px, the rest 600-1000 px on the longer side,
as ImageNet has them), as an ImageFolder tree and as a tar of class tars like ILSVRC2012_img_train.tar. Converts
it as for training (longer side <= 512, quality 90: the fitting JPEGs are stored as they are) and appends one
JSON record per run to benchmarks/results/bench_prep.json (replacing an earlier record of the same machine,
settings and number of images): machine, versions, date, system load, the share of images stored as-is
(wall-clock rates are only as good as the machine was quiet; images per CPU-second suffer less from a busy
machine). --ffcv also times ffcv's own DatasetWriter on the folder (decode with PIL, no validation pass).
"""

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data_prep.convert import convert  # noqa: E402
from mugs_fast.metrics import code_version  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_prep.json"


def photo_like(rng: np.random.Generator) -> Image.Image:
    """Smooth shapes at several scales plus sensor-like noise: compresses like a photograph (~110 KB at q95)."""
    w, h = int(rng.integers(360, 441)), int(rng.integers(300, 401))
    img = np.zeros((h, w, 3), np.float32)
    for cells, weight in ((3, 90), (12, 45), (48, 30), (160, 30)):  # coarse to fine detail
        coarse = rng.normal(0, 1, size=(cells, cells, 3)).astype(np.float32)
        for c in range(3):
            img[..., c] += weight * np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.Resampling.BICUBIC))
    img += rng.normal(0, 10, size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8))


def large_photo_like(rng: np.random.Generator) -> Image.Image:
    """A photo-like image larger than 512 px (ImageNet's ~10%): re-encoded by a conversion."""
    w = int(rng.integers(600, 1001))
    return photo_like(rng).resize((w, int(w * rng.uniform(0.65, 0.8))), Image.Resampling.BICUBIC)


def make_inputs(
    root: Path, n: int, large_share: float = 0.0, classes: int = 8, seed: int = 0, archive: Path | None = None
) -> dict:
    """The images as root/<class>/<image>.JPEG and, with `archive`, also as that tar of class tars (the layout of
    ILSVRC2012_img_train.tar)."""
    rng = np.random.default_rng(seed)
    sizes, pixels, large = [], [], 0
    for i in range(n):
        is_large = rng.random() < large_share
        img = large_photo_like(rng) if is_large else photo_like(rng)
        large += is_large
        path = root / f"n{i % classes:08d}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95)
        sizes.append(path.stat().st_size)
        pixels.append(img.size)
    if archive is not None:
        write_class_tars(root, archive)
    w, h = np.mean(pixels, axis=0)
    return {
        "images": n,
        "mean_kb": round(float(np.mean(sizes)) / 1e3, 1),
        "mean_size": f"{w:.0f}x{h:.0f}",
        "larger_than_512_share": round(large / n, 3),
    }


def write_class_tars(folder: Path, archive: Path) -> None:
    """`archive`: one uncompressed <class>.tar per class folder of `folder`, inside one tar."""
    with tarfile.open(archive, "w") as outer:
        for class_dir in sorted(folder.iterdir()):
            inner_path = archive.with_name(f"{class_dir.name}.tar")
            with tarfile.open(inner_path, "w") as inner:
                for path in sorted(class_dir.iterdir()):
                    inner.add(path, arcname=path.name)
            outer.add(inner_path, arcname=inner_path.name)
            inner_path.unlink()


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the pool workers, once joined)."""
    return sum(getattr(resource.getrusage(who), f) for who in (0, -1) for f in ("ru_utime", "ru_stime"))


def time_ours(src: Path, dst: Path, workers: int) -> tuple[float, float, float]:
    """Seconds, CPU seconds, share of the images stored as they were."""
    cpu = cpu_seconds()
    summary = convert(src, dst, workers=workers, overwrite=True, progress=False)
    return summary.seconds, cpu_seconds() - cpu, summary.stored_as_is / summary.written


def time_ffcv(src: Path, dst: Path, workers: int) -> tuple[float, float, float]:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Folder:  # what ffcv's examples do: decode with PIL in ffcv's worker processes
        def __init__(self, root):
            self.items = [(p, i) for i, d in enumerate(sorted(root.iterdir())) for p in sorted(d.iterdir())]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return Image.open(path).convert("RGB"), label

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=512, jpeg_quality=90), "label": IntField()}
    dst.unlink(missing_ok=True)
    cpu, start = cpu_seconds(), time.perf_counter()
    # chunks of 16 rather than ffcv's 100: with a few hundred images, 100 would leave workers idle at the end
    DatasetWriter(str(dst), fields, num_workers=workers).from_indexed_dataset(Folder(src), chunksize=16)
    seconds = time.perf_counter() - start
    for worker in multiprocessing.active_children():  # ffcv never joins its workers: reap them for their CPU time
        worker.join()
    return seconds, cpu_seconds() - cpu, 0.0  # ffcv re-encodes every image


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
    }


def versions(with_ffcv: bool) -> dict:
    code = code_version()  # no git (e.g. the GPU machine): commit "unknown"
    out = {
        "mugs_fast_commit": (code["commit"] or "unknown")[:7] + ("-dirty" if code["dirty"] else ""),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
    }
    if with_ffcv:
        out["ffcv"] = importlib.metadata.version("ffcv")
    return out


def run(args) -> dict:
    record = {
        "benchmark": "bench_prep",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(args.ffcv),
        "settings": {
            "max_resolution": 512,
            "jpeg_quality": 90,
            "repeats": args.repeats,
            "ffcv_chunksize": 16,
            "large_share": args.large_share,
        },
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "results": [],
    }
    runs = [("data_prep.convert", "folder", time_ours), ("data_prep.convert", "archive", time_ours)]
    runs += [("ffcv DatasetWriter", "folder", time_ffcv)] if args.ffcv else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        record["input"] = make_inputs(tmp / "folder", args.images, args.large_share, archive=tmp / "train.tar")
        for tool, source, timer in runs:
            src = tmp / "folder" if source == "folder" else tmp / "train.tar"
            for workers in args.workers:
                times = [timer(src, tmp / "out.beton", workers) for _ in range(args.repeats)]
                seconds, cpu, as_is = min(times)  # the least disturbed run
                record["results"].append(
                    {
                        "tool": f"{tool} ({source})",
                        "source": source,
                        "workers": workers,
                        "seconds": round(seconds, 3),
                        "images_per_s": round(args.images / seconds, 1),
                        "images_per_s_per_worker": round(args.images / seconds / workers, 1),
                        "images_per_cpu_s": round(args.images / cpu, 1),
                        "stored_as_is_share": round(as_is, 3),
                        "output_mb": round((tmp / "out.beton").stat().st_size / 1e6, 1),
                    }
                )
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return record


def save(record: dict, path: Path) -> None:
    """Appends the record, replacing an earlier one of the same machine, settings and input size."""
    key = lambda r: json.dumps([r["machine"], r["settings"], r["input"]["images"]], sort_keys=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r for r in old if key(r) != key(record)] + [record], indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, len(os.sched_getaffinity(0))}))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--large-share", type=float, default=0.1, help="share of images larger than 512 px (0.1)")
    parser.add_argument("--ffcv", action="store_true", help="also time ffcv's DatasetWriter")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    record = run(args)
    save(record, args.out)
    m, inp = record["machine"], record["input"]
    print(
        f"{m['cpu']} ({m['usable_cores']} cores), {inp['images']} JPEGs of ~{inp['mean_size']} px, "
        f"{inp['mean_kb']} KB, {inp['larger_than_512_share']:.0%} larger than 512 px; "
        f"load average {record['load_average_before'][0]} -> {record['load_average_after'][0]}"
    )
    print(f"{'tool':<30} {'workers':>7} {'images/s':>9} {'per worker':>10} {'per CPU-s':>9} {'as-is':>6}")
    for r in record["results"]:
        print(
            f"{r['tool']:<30} {r['workers']:>7} {r['images_per_s']:>9} {r['images_per_s_per_worker']:>10} "
            f"{r['images_per_cpu_s']:>9} {r['stored_as_is_share']:>6.0%}"
        )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
