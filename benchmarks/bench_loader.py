"""Multi-crop loading speed: DALI on the GPU, DALI on the CPU and the release's PIL pipeline, in one run.

    python benchmarks/bench_loader.py [FILE.beton] [--images 256] [--batch-size 32] [--cpu-images 512]
                                      [--gpu-batch-sizes 64 128 256] [--gpu-batches 30]

Without a .beton, generates ImageNet-like JPEGs (bench_prep's photo-like images, ~400 x 350 px) and converts
them as for training (longer side <= 512, quality 90). Each pipeline makes the 14 crops (224 / 96 px) of
every image it reads twice: a warm-up epoch, then the timed one. The CPU pipelines read the first --cpu-images
images of the file (they are slow: this bounds their time). The GPU pipeline runs only where CUDA is available
(skipped, and said so, elsewhere), once per batch size of --gpu-batch-sizes (training uses 64 per GPU), on the
file's images repeated until an epoch has --gpu-batches batches of the largest size. One JSON record per
pipeline and batch size is appended to benchmarks/results/bench_loader.json (device, versions, date, cores,
load), replacing an earlier record of the same machine and settings, and a Markdown table is printed. CPU
numbers depend on the machine's load: the load average is recorded.
"""

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import bench_prep  # noqa: E402
from bench_prep import machine, make_inputs, versions  # noqa: E402

from data_prep.convert import convert  # noqa: E402
from data_prep.writer import BetonWriter  # noqa: E402
from mugs_fast.data import MultiCropLoader, ReferenceLoader  # noqa: E402
from mugs_fast.data.beton import BetonReader  # noqa: E402
from mugs_fast.data.contract import CropSpec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_loader.json"
CROPS = 14


def cpu_seconds() -> float:
    """CPU time of this process and its children, finished or alive (DataLoader workers stay alive)."""
    tick, alive = os.sysconf("SC_CLK_TCK"), 0.0
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            alive += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return bench_prep.cpu_seconds() + alive


def time_loader(loader, device: str) -> dict:
    """Seconds and CPU seconds of a whole epoch, after a warm-up epoch (caches, workers; no batch prefetched
    across the epoch boundary, so the timed epoch does all of its own work)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in loader:
        pass
    loader.set_epoch(1)
    sync()
    cpu, start, images = cpu_seconds(), time.perf_counter(), 0
    for batch in loader:
        images += len(batch["label"])
    sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "images": images}


def copy_samples(path: Path, dst: Path, indices) -> Path:
    """A .beton holding the samples `indices` of `path` (repeats allowed), in that order."""
    reader = BetonReader(path)
    indices = list(indices)
    with BetonWriter(dst, len(indices), reader.page_size) as writer:
        for i in indices:
            jpeg, label = reader[i]
            writer.add(jpeg.tobytes(), int(reader.heights[i]), int(reader.widths[i]), label)
        writer.finish()
    return dst


def run_pipeline(name: str, path: Path, batch_size: int, cores: int) -> dict:
    common = dict(crops=CropSpec(local_crops_number=CROPS - 4), seed=0)
    if name == "dali-gpu":
        device = "cuda"
        loader = MultiCropLoader(path, batch_size, device="cuda", num_threads=cores, **common)
    elif name == "dali-cpu":
        device = "cpu"
        loader = MultiCropLoader(path, batch_size, device="cpu", num_threads=cores, **common)
    else:  # the release's pipeline: workers make the crops, the GPU (if any) normalises
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loader = ReferenceLoader(path, batch_size, device=device, num_workers=cores, **common)
    t = time_loader(loader, device)
    img_s = t["images"] / t["seconds"]
    return {
        "pipeline": name,
        "device": torch.cuda.get_device_name() if name == "dali-gpu" else machine()["cpu"],
        "img_s": round(img_s, 1),
        "crops_s": round(img_s * CROPS, 1),
        "cpu_cores": cores,
        "img_s_per_core": round(img_s / cores, 2),
        "cpu_busy": round(t["cpu_seconds"] / t["seconds"], 2),  # cores kept busy on average
        "batch_size": batch_size,
        "images_timed": t["images"],
    }


def loader_versions() -> dict:
    out = versions(with_ffcv=False) | {"torch": torch.__version__}
    for package in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "torchvision", "timm"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def run(args):
    """Yields one record per measurement, as soon as it is taken."""
    cores = len(os.sched_getaffinity(0))
    pipelines = [p for p in args.pipelines if p != "dali-gpu" or torch.cuda.is_available()]
    if "dali-gpu" in args.pipelines and "dali-gpu" not in pipelines:
        print("dali-gpu: skipped, no CUDA device on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        path, source = args.beton, {"beton": str(args.beton)}
        if path is None:
            source = make_inputs(Path(tmp) / "src", args.images)
            path = Path(tmp) / "bench.beton"
            convert(Path(tmp) / "src", path, max_resolution=512, jpeg_quality=90, progress=False)
        runs = _runs(pipelines, path, Path(tmp), args)
        common = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": loader_versions(),
            "input": source,
            "crop_sizes": [224, 96],
        }
        for name, run_path, batch_size in runs:
            load = os.getloadavg()[0]
            record = run_pipeline(name, run_path, batch_size, cores)
            yield {**record, **common, "load_average_before": round(load, 2)}


def _runs(pipelines: list[str], path: Path, tmp: Path, args) -> list[tuple[str, Path, int]]:
    """(pipeline, .beton, batch size) of each measurement, most telling first: the GPU at training's batch."""
    runs, num_images = [], len(BetonReader(path))
    if "dali-gpu" in pipelines:
        images = args.gpu_batches * max(args.gpu_batch_sizes)
        gpu_path = copy_samples(path, tmp / "gpu.beton", [i % num_images for i in range(images)])
        runs += [("dali-gpu", gpu_path, b) for b in args.gpu_batch_sizes]
    cpu = [name for name in pipelines if name != "dali-gpu"]
    if cpu:
        cpu_path = path
        if args.cpu_images < num_images:
            cpu_path = copy_samples(path, tmp / "cpu.beton", range(args.cpu_images))
        runs += [(name, cpu_path, args.batch_size) for name in cpu]
    return runs


def save(records: list[dict], path: Path) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["pipeline"], r["device"], r["cpu_cores"], r["batch_size"], json.dumps(r["input"]))
    new_keys = {key(r) for r in records}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r for r in old if key(r) not in new_keys] + records, indent=1) + "\n")


def table(records: list[dict]) -> str:
    lines = [
        "| pipeline | device | batch | CPU cores (busy) | images/s | crops/s | images/s per core |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['pipeline']} | {r['device']} | {r['batch_size']} | {r['cpu_cores']} ({r['cpu_busy']}) | "
            f"{r['img_s']:,} | {r['crops_s']:,} | {r['img_s_per_core']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("beton", type=Path, nargs="?", help="a .beton to read (default: generate ImageNet-like)")
    parser.add_argument("--images", type=int, default=256, help="images to generate without a .beton (GPU: more)")
    parser.add_argument("--batch-size", type=int, default=32, help="for the CPU pipelines")
    parser.add_argument("--cpu-images", type=int, default=512, help="images the CPU pipelines read (the first ones)")
    parser.add_argument(
        "--gpu-batch-sizes",
        "--gpu-batch-size",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="batch sizes of the GPU pipeline, one measurement each (training: 64 per GPU)",
    )
    parser.add_argument(
        "--gpu-batches", type=int, default=30, help="batches of the largest size per GPU epoch (images repeated)"
    )
    parser.add_argument(
        "--pipelines",
        nargs="+",
        default=["dali-gpu", "dali-cpu", "reference"],
        choices=["dali-gpu", "dali-cpu", "reference"],
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.beton is not None and not args.beton.is_file():
        parser.error(f"no .beton file at {args.beton}")
    if min(args.batch_size, args.cpu_images, args.gpu_batches, *args.gpu_batch_sizes) < 1:
        parser.error("--batch-size, --cpu-images, --gpu-batches and --gpu-batch-sizes must be >= 1")

    records = []
    for record in run(args):  # saved one by one: a run stopped by a time budget keeps what it measured
        records.append(record)
        save([record], args.out)
        print(f"{record['pipeline']} (batch {record['batch_size']}): {record['img_s']:,} images/s", flush=True)
    print(table(records))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
