"""The fast linear probe's cost: feature extraction images/s and the sweep's time, scaled to ImageNet-1k.

    python benchmarks/bench_linear.py [FILE.beton] [--images 4096] [--arch vit_small] [--sweep-rows 131072]
                                      [--sweep-epochs 3] [--quick]

Extraction: `mugs_fast.linear_features.extract_from` over the .beton (generated without one: bench_prep's
ImageNet-like JPEGs, ~400 x 350 px, converted as for training) with a randomly initialised backbone at 224 px and
the recipe's features (ViT-S: CLS of the last 4 blocks, 1536 values), each image as its centre crop and its flip
(two forward passes), bf16 on the GPU; a warm-up pass over the file, then a timed one by a new loader (reading the
file as a probe does). Sweep: the default grid (5 learning rates x 4 weight decays = 20 classifiers) over 1000
classes, batch 1024, on random features of that width, for --sweep-epochs epochs over --sweep-rows rows after a
one-epoch warm-up. Its time per row and epoch scaled to ImageNet-1k (90% of 1,281,167 images trained on, 100
epochs), plus the extraction of the 1,331,167 train + val images at the measured rate, is the whole fast probe's
estimate. One JSON record per run goes to benchmarks/results/bench_linear.json (device, versions, date, load),
replacing an earlier record of the same device and settings. The targets (extraction >= 5,000 images/s for ViT-S,
the whole probe of ImageNet-1k under 10 minutes) are judged on an H100 / H200 only; CPU records are labelled with
the CPU.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_loader import loader_versions  # noqa: E402
from bench_prep import machine  # noqa: E402

from mugs_fast.data.beton import BetonReader  # noqa: E402
from mugs_fast.data.eval_loader import EvalLoader  # noqa: E402
from mugs_fast.linear_features import FeatureSpec, default_feature_type, extract_from  # noqa: E402
from mugs_fast.linear_sweep import DEFAULT_LRS, DEFAULT_WDS, train_grid  # noqa: E402
from mugs_fast.vit import ARCHS, build_backbone  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_linear.json"
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
HOLDOUT, EPOCHS, SWEEP_BATCH = 0.1, 100, 1024  # the CLI's defaults
TARGET_IMG_S, TARGET_TOTAL_S = 5000, 600


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_extraction(path: Path, arch: str, crop: int, batch_size: int, device: torch.device, threads: int) -> dict:
    """Images/s of the probe's feature extraction (crop + flip) over the whole file, after a warm-up pass."""
    backbone = build_backbone(arch, img_size=crop, num_relation_blocks=0).to(device).eval()
    n_last_blocks, avgpool = default_feature_type(arch)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    spec = FeatureSpec(n_last_blocks, avgpool, crop_size=crop, flip=True, dtype=dtype)
    loader_args = dict(crop_size=crop, device=device, num_threads=threads)
    extract_from(backbone, EvalLoader(path, batch_size, **loader_args), spec)  # warm-up: DALI, cuDNN, allocator
    loader = EvalLoader(path, batch_size, **loader_args)  # a fresh one: the timed pass reads the file as a probe does
    sync(device)
    start = time.perf_counter()
    views, _ = extract_from(backbone, loader, spec)
    sync(device)
    seconds = time.perf_counter() - start
    images = views.shape[1]
    return {
        "images": images,
        "crops_per_image": 2,
        "batch_size": batch_size,
        "crop_size": crop,
        "seconds": round(seconds, 3),
        "img_s": round(images / seconds, 1),
        "feature_dim": views.shape[-1],
    }


def time_sweep(dim: int, rows: int, epochs: int, classes: int, device: torch.device) -> dict:
    """Seconds of the default grid over `rows` random features for `epochs` epochs, after a one-epoch warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    views = torch.randn(2, rows, dim, device=device, generator=g).to(dtype)
    labels = torch.randint(0, classes, (rows,), device=device, generator=g)
    args = dict(lrs=DEFAULT_LRS, wds=DEFAULT_WDS, num_classes=classes, batch_size=SWEEP_BATCH, standardize=True)
    all_rows = torch.arange(rows).numpy()
    train_grid(views, labels, all_rows[: min(rows, 4 * SWEEP_BATCH)], epochs=1, **args)  # warm-up
    sync(device)
    start = time.perf_counter()
    train_grid(views, labels, all_rows, epochs=epochs, **args)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "classifiers": len(DEFAULT_LRS) * len(DEFAULT_WDS),
        "classes": classes,
        "rows": rows,
        "epochs": epochs,
        "batch_size": SWEEP_BATCH,
        "seconds": round(seconds, 3),
        "us_per_row_epoch": round(1e6 * seconds / (rows * epochs), 4),
    }


def imagenet_estimate(extraction: dict, sweep: dict) -> dict:
    """The whole fast probe of ImageNet-1k at the measured rates (the sweep's cost grows with rows x classes)."""
    extraction_s = (IMAGENET_TRAIN + IMAGENET_VAL) / extraction["img_s"]  # val (no flip) counted at the same rate
    rows_epochs = (1 - HOLDOUT) * IMAGENET_TRAIN * EPOCHS
    sweep_s = sweep["us_per_row_epoch"] * 1e-6 * rows_epochs * IMAGENET_CLASSES / sweep["classes"]
    return {
        "train_images": IMAGENET_TRAIN,
        "val_images": IMAGENET_VAL,
        "epochs": EPOCHS,
        "extraction_s": round(extraction_s, 1),
        "sweep_s": round(sweep_s, 1),
        "total_s": round(extraction_s + sweep_s, 1),
    }


def verdicts(record: dict) -> list[dict]:
    """The issue's targets; judged (met True / False) only for ViT-S on an H100 or H200."""
    on_h100 = record["cuda"] and any(gpu in record["device"] for gpu in ("H100", "H200"))
    judged = on_h100 and record["arch"] == "vit_small" and not record["quick"]
    out = []
    for target, value, ok in (
        (
            f"extraction >= {TARGET_IMG_S:,} images/s (ViT-S)",
            record["extraction"]["img_s"],
            record["extraction"]["img_s"] >= TARGET_IMG_S,
        ),
        (
            f"whole fast probe of ImageNet-1k < {TARGET_TOTAL_S // 60} min",
            record["imagenet"]["total_s"],
            record["imagenet"]["total_s"] < TARGET_TOTAL_S,
        ),
    ):
        out.append({"target": target, "value": value, "met": ok if judged else None})
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = len(os.sched_getaffinity(0))
    if device.type == "cpu":
        torch.set_num_threads(threads)  # the loader's threads run between the forward passes
    with tempfile.TemporaryDirectory() as tmp:
        path, source = args.beton, {"beton": str(args.beton)}
        if path is None:
            from bench_step import make_beton

            path = make_beton(Path(tmp) / "bench.beton", args.images, threads)
            source = {"images": args.images, "generated": "bench_prep ImageNet-like JPEGs"}
        source["images"] = len(BetonReader(path))
        load = os.getloadavg()[0]
        extraction = time_extraction(path, args.arch, args.crop, args.batch_size, device, threads)
    sweep = time_sweep(extraction["feature_dim"], args.sweep_rows, args.sweep_epochs, args.classes, device)
    record = {
        "benchmark": "bench_linear",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({machine()['cpu']})",
        "cuda": device.type == "cuda",
        "arch": args.arch,
        "quick": args.quick,
        "extraction": extraction,
        "sweep": sweep,
        "imagenet": imagenet_estimate(extraction, sweep),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": loader_versions(),
        "input": source,
        "load_average_before": round(load, 2),
    }
    record["targets"] = verdicts(record)
    return record


def save(record: dict, path: Path) -> None:
    """Appends the record, replacing an earlier one of the same device, settings and input."""
    key = lambda r: json.dumps([r["device"], r["arch"], r["quick"], r["sweep"]["rows"], r["input"]], sort_keys=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r for r in old if key(r) != key(record)] + [record], indent=1) + "\n")


def table(records: list[dict]) -> str:
    lines = [
        "| model | device | extraction images/s | sweep us / row / epoch (20 classifiers) | ImageNet-1k: extraction "
        "| sweep | total |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        e, s, i = r["extraction"], r["sweep"], r["imagenet"]
        lines.append(
            f"| {r['arch']} | {r['device']} | {e['img_s']:,} | {s['us_per_row_epoch']:,.2f} (C = {s['classes']:,}) | "
            f"{i['extraction_s'] / 60:,.1f} min | {i['sweep_s'] / 60:,.1f} min | {i['total_s'] / 60:,.1f} min |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("beton", type=Path, nargs="?", help="a .beton to read (default: generate ImageNet-like)")
    p.add_argument("--images", type=int, default=4096, help="images to generate without a .beton")
    p.add_argument("--arch", choices=tuple(ARCHS), default="vit_small", help="backbone (default vit_small)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass of the extraction")
    p.add_argument("--sweep-rows", type=int, default=131072, help="random feature rows the sweep trains on")
    p.add_argument("--sweep-epochs", type=int, default=3, help="timed epochs of the sweep")
    p.add_argument("--classes", type=int, default=IMAGENET_CLASSES, help="classes of the sweep (scaled to 1000)")
    p.add_argument("--quick", action="store_true", help="smoke run: ViT-Ti on 64 px, a 512-row sweep, 100 classes")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = p.parse_args(argv)
    if args.beton is not None and not args.beton.is_file():
        p.error(f"no .beton file at {args.beton}")
    if min(args.images, args.batch_size, args.sweep_rows, args.sweep_epochs, args.classes) < 1:
        p.error("--images, --batch-size, --sweep-rows, --sweep-epochs and --classes must be positive")
    if args.quick:
        args.arch, args.sweep_rows, args.sweep_epochs, args.classes = "vit_tiny", 512, 1, 100
    args.crop = 64 if args.quick else 224
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = run(args)
    save(record, args.out)
    print(table([record]))
    for t in record["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not judged (needs ViT-S on an H100 / H200)"}[t["met"]]
        print(f"  target {t['target']}: {t['value']:,} -> {verdict}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
