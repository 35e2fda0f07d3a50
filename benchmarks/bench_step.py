"""Images/s of the whole Mugs training step on one GPU, three ways in one run, with MFU and a profile.

    python benchmarks/bench_step.py                        # ViT-S/16 at B = 64 and 128, ViT-B/16 at B = 64
    python benchmarks/bench_step.py --beton train.beton    # (b) and (c) read your .beton
    python benchmarks/bench_step.py --quick                # CPU smoke: tiny model, 1 + 2 steps, temporary output

Mugs crops (teacher 2 x 224 px; student 2 x 224 + 10 x 96 px), B images per GPU, the release's recipe of the model
(vit_small_100ep, vit_base_400ep) in bf16 autocast, the trainer's numerics (`init_runtime`: TF32, cuDNN autotuning),
timed after the last-layer freeze (every parameter updated, as in most of a run).
  (a) model only: fixed random crops on the GPU through `train_step` (both networks, heads, memories, queues,
      losses, backward, optimizer, EMA); CUDA events around the timed steps, one host sync at their end.
      (Not `SyntheticLoader`: it copies its row indices to the GPU each step, a host sync.)
  (b) end to end: `MultiCropLoader` (DALI on the GPU) over a .beton of ImageNet-like JPEGs feeding the same step;
      `loader_wait_share` is the share of the host's time spent inside the loader, host-GPU syncs of the loader
      included (`end_to_end_syncs_per_step`); what the GPU lost is (b)/(a) and, in the profile, its idle time.
      Without --beton the .beton is made here: bench_prep's photo-like images (~400 x 350 px, ~110 KB), converted
      with the longer side <= 512.
  (c) the release's way: `ReferenceLoader` (PIL + torchvision in one DataLoader worker per core), fp32 (TF32
      matmuls), the PyTorch references of the losses and the top-k (kernels.use("torch")), same model and batch.
      Each worker makes whole batches, so the rate is timed over W = workers batches (one round of them) after
      the first batch has arrived and been trained on.
MFU = FLOPs per image (`mugs_fast.flops`: matmul FLOPs, 128 G for ViT-S/16, 482 G for ViT-B/16) x images/s / the bf16
matmul rate measured in the same run. `syncs_per_step`: host-GPU syncs PyTorch reports in a step (0 is the goal).
Batch sizes: 64 is the release's per-GPU batch of ViT-S, 128 the one-card choice in bf16, and 64 for ViT-B (the
release ran 42). Memory is not what limits them: the tensors kept for backward come to ~0.23 GiB per image for
ViT-S and ~0.44 GiB for ViT-B in fp32 (saved-tensor hooks on the CPU), plus ~0.5 GiB fixed, so even (c)'s fp32
needs ~30 GiB at these batches (`peak_memory_gib` and `release_peak_memory_gib` record the peaks); the 10 minutes
of `run_all.py` are. Larger batches: --configs vit_small:256 vit_base:128.

Writes, replacing records of the same device, model and batch: <out>/bench_step.json (one record per model and
batch), bench_step.md and bench_step.png (the records of this device), profile_step_<arch>.json / .md (torch.profiler
over a few steps of (a) and (b), kernels grouped by `step_profile.CATEGORIES`). Targets and what the profile blames
when one is missed: `step_report`. A failing mode is recorded under `errors` and the others still run.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import step_profile  # noqa: E402
import step_report  # noqa: E402
from bench_prep import machine, make_inputs  # noqa: E402
from step_timing import (  # noqa: E402
    SYNC_CHECK_STEPS,
    Stepper,
    endless,
    fed_from,
    matmul_peak_tflops,
    on_batch,
    syncs_per_step,
    synthetic_batch,
    time_steps,
)

import kernels  # noqa: E402
from data_prep.convert import convert  # noqa: E402
from mugs_fast.config import MugsConfig, recipe  # noqa: E402
from mugs_fast.data.contract import CropSpec  # noqa: E402
from mugs_fast.flops import step_flops_per_image  # noqa: E402
from mugs_fast.runtime import compute_dtype, init_runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = {"vit_small": "vit_small_100ep", "vit_base": "vit_base_400ep", "vit_large": "vit_large_250ep"}
DEFAULT_CONFIGS = ("vit_small:64", "vit_small:128", "vit_base:64")
QUICK_BATCH = 5
MODES = ("model_only", "end_to_end", "release_way")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", nargs="+", metavar="ARCH:B", help=f"models and batches (default: {' '.join(DEFAULT_CONFIGS)})"
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time (default: all)")
    p.add_argument("--beton", type=Path, help="the .beton for (b) and (c) (default: generate ImageNet-like images)")
    p.add_argument("--images", type=int, help="images to generate without --beton (default 4000; --quick 48)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; --quick 1)")
    p.add_argument("--steps", type=int, help="timed steps of (a) and (b) (default 20; --quick 2)")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps of (a) and (b), GPU only; 0: none")
    p.add_argument("--release-rounds", type=int, default=1, help="rounds of W batches timed in (c) (default 1)")
    p.add_argument("--workers", type=int, help=f"(c)'s DataLoader workers (default: all cores, {cores}; --quick 2)")
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS}; with --quick a new temporary one)")
    p.add_argument("--quick", action="store_true", help="smoke run (CPU is fine): tiny model, B = 5, fewer steps")
    args = p.parse_args(argv)
    if args.quick and args.configs:
        p.error("--configs does not go with --quick (which runs a tiny model)")
    try:
        args.configs = [("vit_tiny", QUICK_BATCH)] if args.quick else parse_configs(args.configs or DEFAULT_CONFIGS)
    except ValueError as e:
        p.error(str(e))
    defaults = (
        dict(images=48, warmup=1, steps=2, workers=min(cores, 2))
        if args.quick
        else dict(images=4000, warmup=5, steps=20, workers=cores)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.images, args.steps, args.workers, args.release_rounds) < 1 or min(args.warmup, args.profile_steps) < 0:
        p.error("--images, --steps, --workers and --release-rounds must be >= 1, --warmup and --profile-steps >= 0")
    if args.beton is not None and not args.beton.is_file():
        p.error(f"no .beton file at {args.beton}")
    return args


def parse_configs(specs: list[str]) -> list[tuple[str, int]]:
    """['vit_small:64', ...] -> [('vit_small', 64), ...]; ValueError naming the bad entry."""
    configs = []
    for spec in specs:
        arch, _, batch = spec.partition(":")
        if arch not in RECIPES or not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"bad config {spec!r}: expected ARCH:B with ARCH in {', '.join(RECIPES)} and B >= 1")
        configs.append((arch, int(batch)))
    return configs


def bench_config(arch: str, batch: int, quick: bool) -> MugsConfig:
    """The release's recipe of `arch` at `batch` images per GPU; with `quick`, a 2-block ViT-Tiny on 64/32-px crops."""
    if quick:
        return recipe("tiny", depth=2, batch_size_per_gpu=batch, local_crops_number=3)
    return recipe(RECIPES[arch], batch_size_per_gpu=batch)


# ---- the three ways ----


def profile_of(step: Callable[[], float], steps: int, device: torch.device) -> dict | None:
    """The step_profile summary of `steps` calls of `step` (None without CUDA or with 0 steps)."""
    if steps == 0 or device.type != "cuda":
        return None
    return step_profile.summarize(step_profile.capture(step, steps), steps)


def model_only(stepper: Stepper, cfg: MugsConfig, batch: int, args, device: torch.device) -> tuple[dict, dict | None]:
    """(a): random crops already on the device, in the loader's dtype (bf16 on a GPU)."""
    dtype = compute_dtype(cfg.precision, device)
    step = on_batch(stepper, synthetic_batch(cfg, batch, device, dtype))
    seconds, _ = time_steps(step, args.warmup, args.steps, device)
    result = {"model_only_img_s": args.steps * batch / seconds, "step_ms": 1e3 * seconds / args.steps}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["syncs_per_step"] = syncs_per_step(step)
    return result, profile_of(step, args.profile_steps, device)


def end_to_end(
    stepper: Stepper, cfg: MugsConfig, batch: int, beton: Path, args, device: torch.device
) -> tuple[dict, dict | None]:
    """(b): the DALI loader (on the GPU; DALI's CPU operators in a CPU smoke run) feeding the step."""
    from mugs_fast.data import MultiCropLoader

    loader = MultiCropLoader(beton, batch, crops=CropSpec.from_config(cfg), device=device)
    batches = endless(loader)
    try:
        step = fed_from(batches, stepper)
        seconds, wait = time_steps(step, args.warmup, args.steps, device)
        result = {"end_to_end_img_s": args.steps * batch / seconds, "loader_wait_share": wait}
        if device.type == "cuda":
            result["end_to_end_syncs_per_step"] = syncs_per_step(step)
        profile = profile_of(step, args.profile_steps, device)
    finally:
        batches.close()  # lets the loader drain DALI's queue
    return result, profile


def release_way(cfg: MugsConfig, batch: int, beton: Path, args, device: torch.device) -> tuple[dict, None]:
    """(c): the release's CPU pipeline, fp32 (TF32 matmuls, as every mode: `init_runtime`), PyTorch losses and
    top-k; W batches timed after the first."""
    from mugs_fast.data import ReferenceLoader

    cfg = cfg.replace(precision="fp32")
    count = args.workers * args.release_rounds
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with kernels.use("torch"):  # the PyTorch references of the losses and the top-k
        stepper = Stepper(cfg, device)
        stepper(synthetic_batch(cfg, batch, device, torch.float32))  # the first step's set-up stays out of the timing
        loader = ReferenceLoader(beton, batch, crops=CropSpec.from_config(cfg), device=device, num_workers=args.workers)
        batches = iter(loader)
        try:
            seconds, wait = time_steps(fed_from(batches, stepper), 1, count, device)
        finally:
            batches.close()  # stops the workers
    result = {"release_way_img_s": count * batch / seconds, "release_loader_wait_share": wait}
    result |= {"release_workers": args.workers, "release_batches_timed": count}
    if device.type == "cuda":
        result["release_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result, None


def attempt(record: dict, profiles: dict, mode: str, run: Callable[[], tuple[dict, dict | None]]) -> None:
    """Runs one mode into `record` (and its profile into `profiles`); a failure is recorded, not raised."""
    print(f"  {mode.replace('_', ' ')} ...", flush=True)
    try:
        result, profile = run()
    except Exception as e:  # noqa: BLE001 - one failing mode must not cost the others' numbers
        traceback.print_exc()
        record["errors"][mode] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record.update(result)
    print("    " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)), flush=True)
    if profile is not None:
        profiles[mode] = profile


def run_config(arch: str, batch: int, beton: Path | None, base: dict, args, device) -> tuple[dict, list[dict]]:
    """One model and batch, all requested modes: its bench_step record and its profile records."""
    cfg = bench_config(arch, batch, args.quick)
    record = new_record(cfg, arch, batch, base, args)
    profiles: dict[str, dict] = {}
    if {"model_only", "end_to_end"} & set(args.modes):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stepper = Stepper(cfg, device)
        if "model_only" in args.modes:
            attempt(record, profiles, "model_only", lambda: model_only(stepper, cfg, batch, args, device))
        if "end_to_end" in args.modes:
            attempt(record, profiles, "end_to_end", lambda: end_to_end(stepper, cfg, batch, beton, args, device))
        record["nonfinite"] = stepper.model.nonfinite_report()  # sync, after the timing: the numbers trained
        del stepper
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "release_way" in args.modes:
        attempt(record, profiles, "release_way", lambda: release_way(cfg, batch, beton, args, device))
    derive(record)
    record["targets"] = step_report.verdicts(record, profiles)
    keep = ("device", "torch", "triton", "date", "quick")
    profile_records = [
        {**{k: base[k] for k in keep}, "arch": arch, "batch_per_gpu": batch, "mode": mode, **summary}
        for mode, summary in profiles.items()
    ]
    return record, profile_records


def new_record(cfg: MugsConfig, arch: str, batch: int, base: dict, args) -> dict:
    """A bench_step record before any measurement: environment, model, batch, FLOPs, empty results."""
    flops = step_flops_per_image(cfg)
    crops = f"teacher 2x{cfg.global_crop_size}; student 2x{cfg.global_crop_size} + "
    return {
        **base,
        "arch": arch,
        "batch_per_gpu": batch,
        "recipe": cfg.recipe,
        "crops": crops + f"{cfg.local_crops_number}x{cfg.size_crops[0]}",
        "model_only_img_s": None,
        "end_to_end_img_s": None,
        "release_way_img_s": None,
        "mfu": None,
        "flops_per_image": flops["total"],
        "flops_breakdown": {k: v for k, v in flops.items() if k != "total"},
        "steps": {"warmup": args.warmup, "timed": args.steps, "profiled": args.profile_steps},
        "errors": {},
    }


def derive(record: dict) -> None:
    """MFU of (a) and (b), (b)/(a) and (b)/(c), from the measured rates."""
    rate = record["flops_per_image"] / (record["peak_tflops"] * 1e12)
    a, b, c = record["model_only_img_s"], record["end_to_end_img_s"], record["release_way_img_s"]
    record["mfu"] = a * rate if a else None
    record["mfu_end_to_end"] = b * rate if b else None
    record["end_to_end_share"] = b / a if a and b else None
    record["speedup_vs_release"] = b / c if b and c else None


# ---- data, environment, output ----


def make_beton(dst: Path, images: int, workers: int) -> Path:
    """A .beton of `images` ImageNet-like JPEGs (bench_prep's photo-like images, made in `workers` processes),
    converted as for training (longer side <= 512, quality 90)."""
    src = dst.with_name(dst.stem + "-jpegs")
    shares = [images // workers + (i < images % workers) for i in range(workers)]
    with multiprocessing.Pool(workers) as pool:  # one sub-folder per process: its own names and seed
        pool.starmap(make_inputs, [(src / f"part{i:02d}", n, 0.0, 8, i) for i, n in enumerate(shares) if n])
    convert(src, dst, max_resolution=512, jpeg_quality=90, workers=workers, progress=False, overwrite=True)
    shutil.rmtree(src)
    return dst


def check_data(beton: Path, args) -> str | None:
    """Why the .beton is too small for (c) (None if it is not); warns when (b) will cross an epoch boundary."""
    from mugs_fast.data.beton import BetonReader

    images = len(BetonReader(beton))
    for arch, batch in args.configs:
        need = (1 + args.workers * args.release_rounds) * batch
        if "release_way" in args.modes and need > images:
            return (
                f"the .beton has {images} images; (c) at {arch} B = {batch} with {args.workers} workers needs {need} "
                "(more --images, or fewer --workers)"
            )
        steps = args.warmup + args.steps + SYNC_CHECK_STEPS + args.profile_steps
        if "end_to_end" in args.modes and steps * batch > images:
            print(f"note: {images} images: (b) at B = {batch} crosses an epoch boundary (DALI restarts its queue)")
    return None


def environment(device: torch.device, quick: bool) -> dict:
    """What the numbers depend on: device, versions, CPU (for (c)) and date."""
    import triton

    cpu = machine()
    cuda = device.type == "cuda"
    versions = {}
    for package in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "benchmark": "bench_step",
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({cpu['cpu']})",
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dali": versions.get("nvidia-dali-cuda130") or versions.get("nvidia-dali-cuda120"),
        "timm": versions.get("timm"),
        "cuda_version": torch.version.cuda,
        "cpu": cpu["cpu"],
        "cpu_cores": cpu["usable_cores"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
    }


def save(records: list[dict], path: Path, key: tuple[str, ...]) -> None:
    """Add `records` to the JSON list at `path`, replacing earlier records with the same `key` fields."""
    old = json.loads(path.read_text()) if path.exists() else []
    new_keys = {tuple(r[k] for k in key) for r in records}
    kept = [r for r in old if tuple(r.get(k) for k in key) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + records, indent=1) + "\n")


def write_results(out: Path, records: list[dict], profiles: list[dict]) -> None:
    save(records, out / "bench_step.json", ("device", "arch", "batch_per_gpu"))
    for arch in sorted({p["arch"] for p in profiles}):
        mine = [p for p in profiles if p["arch"] == arch]
        save(mine, out / f"profile_step_{arch}.json", ("device", "arch", "batch_per_gpu", "mode"))
    step_report.write_views(out)


def run(args, device: torch.device, beton: Path | None) -> tuple[list[dict], list[dict]]:
    base = environment(device, args.quick)
    base["peak_tflops"], base["peak_dtype"] = matmul_peak_tflops(device)
    print(f"{base['device']}: {base['peak_dtype']} matmul {base['peak_tflops']:.3g} TFLOP/s", flush=True)
    records, profiles = [], []
    for arch, batch in args.configs:
        print(f"{arch}, B = {batch}:", flush=True)
        record, profile_records = run_config(arch, batch, beton, base, args, device)
        records.append(record)
        profiles += profile_records
    return records, profiles


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print("bench_step: needs a CUDA GPU (GPU numbers only); --quick runs a CPU smoke test", file=sys.stderr)
        return 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_step-")) if args.quick else RESULTS)
    with tempfile.TemporaryDirectory(prefix="bench_step-") as tmp:
        beton = args.beton
        if {"end_to_end", "release_way"} & set(args.modes):
            if beton is None:
                print(f"making a .beton of {args.images} ImageNet-like images ...", flush=True)
                beton = make_beton(Path(tmp) / "imagenet-like.beton", args.images, len(os.sched_getaffinity(0)))
            problem = check_data(beton, args)
            if problem:
                print(f"bench_step: {problem}", file=sys.stderr)
                return 1
        device = init_runtime(MugsConfig()).device  # the trainer's numerics: TF32, cuDNN autotuning
        records, profiles = run(args, device, beton)
    write_results(out, records, profiles)
    print(step_report.table(records))
    print(f"-> {out}")
    return 1 if any(r["errors"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
