"""Multi-crop loading speed: DALI on the GPU, DALI on the CPU and the release's PIL pipeline, in one run.

    python benchmarks/bench_loader.py [FILE.beton] [--images 256] [--batch-size 32] [--gpu-batch-size 256]

Without a .beton, generates ImageNet-like JPEGs (bench_prep's photo-like images, ~400 x 350 px) and converts
them as for training (longer side <= 512, quality 90). Each pipeline makes the 14 crops (224 / 96 px) of
every image of the file twice: a warm-up epoch, then the timed one. The GPU pipeline runs only where CUDA is
available (skipped, and said so, elsewhere), on the same images repeated until an epoch has --gpu-batches
batches. One JSON record per pipeline is appended to benchmarks/results/bench_loader.json (device, versions,
date, cores, load), replacing an earlier record of the same machine and settings, and a Markdown table is
printed. CPU numbers depend on the machine's load: the load average is recorded.
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


def repeated(path: Path, dst: Path, times: int) -> Path:
    """A copy of the .beton with every sample `times` times (for GPU epochs of many batches)."""
    reader = BetonReader(path)
    with BetonWriter(dst, len(reader) * times, reader.page_size) as writer:
        for _ in range(times):
            for i in range(len(reader)):
                jpeg, label = reader[i]
                writer.add(jpeg.tobytes(), int(reader.heights[i]), int(reader.widths[i]), label)
        writer.finish()
    return dst


def run_pipeline(name: str, path: Path, args, cores: int) -> dict:
    common = dict(local_crops_number=CROPS - 4, seed=0)
    if name == "dali-gpu":
        device, batch_size = "cuda", args.gpu_batch_size
        loader = MultiCropLoader(path, batch_size, device="cuda", num_threads=cores, **common)
    elif name == "dali-cpu":
        device, batch_size = "cpu", args.batch_size
        loader = MultiCropLoader(path, batch_size, device="cpu", num_threads=cores, **common)
    else:  # the release's pipeline: workers make the crops, the GPU (if any) normalises
        device, batch_size = ("cuda" if torch.cuda.is_available() else "cpu"), args.batch_size
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


def run(args) -> list[dict]:
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
        paths = {name: path for name in pipelines}
        if "dali-gpu" in pipelines:
            times = -(-args.gpu_batches * args.gpu_batch_size // len(BetonReader(path)))
            if times > 1:
                paths["dali-gpu"] = repeated(path, Path(tmp) / "gpu.beton", times)
                source = {**source, "gpu_repeats": times}
        common = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": loader_versions(),
            "input": source,
            "crop_sizes": [224, 96],
        }
        records = []
        for name in pipelines:
            load = os.getloadavg()[0]
            record = run_pipeline(name, paths[name], args, cores)
            records.append({**record, **common, "load_average_before": round(load, 2)})
    return records


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
    parser.add_argument("--gpu-batch-size", type=int, default=256)
    parser.add_argument("--gpu-batches", type=int, default=30, help="batches per GPU epoch (images repeated)")
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

    records = run(args)
    save(records, args.out)
    print(table(records))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
