"""Speed and memory of the Triton kernels against eager PyTorch, at Mugs sizes, on one CUDA GPU.

    python benchmarks/bench_kernels.py                   # GPU: writes benchmarks/results/bench_kernels.json
    python benchmarks/bench_kernels.py --quick           # smoke run, tiny shapes (CPU: Triton's interpreter);
                                                         # writes nothing unless --out is given

topk_cosine: k = 8 over a 65,536-row memory kept as a normalised bf16 shadow, queries of the teacher (2B rows) and of
all student crops (12B rows), ViT-S and ViT-B widths; against bf16 matmul + torch.topk on the same shadow (`torch_ms`),
the release's way (re-normalise the fp32 memory, fp32 matmul, topk: `ref_ms`) and the matmul floor (2*Q*N*D FLOPs at
the bf16 rate measured in the same run). info_nce: 12 crops x B student rows, 2 x B teacher rows, a 65,536 x 256
queue, bf16 under bf16 autocast; forward+backward (gradient to the student) and forward alone under no_grad,
against the eager reference under the same autocast. Times are medians of CUDA-event timings, peak memory is the
increase of torch.cuda.max_memory_allocated over the inputs. One JSON record per op and shape replaces an earlier
record of the same op, shape and device; a Markdown table is printed last.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernels.json"
MEMORY_ROWS = 65536
CROPS, TOP_K, TAU, EMBED = 12, 8, 0.2, 256
TARGETS = {"topk_cosine": "speedup >= 3 and floor_ratio <= 2", "info_nce": "speedup >= 5 and memory_ratio >= 20"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: checks that the code runs")
    parser.add_argument("--out", type=Path, help=f"JSON file to update (default on a GPU: {RESULTS})")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128], help="images per GPU (B)")
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 768], help="backbone widths (top-k D)")
    parser.add_argument("--repeats", type=int, default=20)
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.quick and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kernels)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import triton  # noqa: E402

import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` after two warm-up calls (CUDA events on the GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # sync: read this repeat's time
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_mib(fn) -> float | None:
    """Peak memory `fn()` allocates beyond what is allocated before it (None off the GPU)."""
    if DEVICE != "cuda":
        fn()
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bf16_matmul_tflops(size: int, repeats: int) -> float:
    """The bf16 matmul rate of this device, measured on a square GEMM."""
    a = torch.randn(size, size, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE).to(torch.bfloat16)
    return 2 * size**3 / (time_ms(lambda: a @ b, repeats) * 1e-3) / 1e12


def forced_triton(fn):
    """`fn` under `kernels.use("triton")`: the Triton path or an error, never a silent fallback."""

    def run(*args):
        with kernels.use("triton"):
            return fn(*args)

    return run


def bench_topk(batch: int, dim: int, rows: int, rows_name: str, n: int, rate: float, repeats: int) -> dict:
    memory = torch.randn(n, dim, device=DEVICE)  # the fp32 memory, as stored
    shadow = F.normalize(memory, dim=1).to(torch.bfloat16)  # what the Mugs memories keep for the search
    queries = torch.randn(rows, dim, device=DEVICE).to(torch.bfloat16)
    topk_triton = forced_triton(lambda: kernels.topk_cosine(queries, shadow, TOP_K))

    def topk_torch():  # bf16 matmul + torch.topk over the same shadow
        return (F.normalize(queries, dim=1) @ shadow.T).float().topk(TOP_K, dim=1)

    sims, _ = topk_triton()
    err = (sims - kernels.topk_cosine_ref(queries, memory, TOP_K)[0]).abs().max().item()
    record = measure(topk_triton, topk_torch, repeats)
    record["ref_ms"] = time_ms(lambda: kernels.topk_cosine_ref(queries, memory, TOP_K), repeats)
    record["floor_ms"] = 2 * rows * n * dim / (rate * 1e12) * 1e3
    record["floor_ratio"] = record["triton_ms"] / record["floor_ms"]
    shape = {"B": batch, "queries": f"{rows_name} = {rows}", "N": n, "D": dim, "k": TOP_K}
    return {"op": "topk_cosine", "shape": shape, **record, "max_abs_err": err}


def bench_info_nce(batch: int, n: int, grad: bool, repeats: int) -> dict:
    student, teacher, queue = (
        F.normalize(torch.randn(r, EMBED, device=DEVICE), dim=1).to(torch.bfloat16)
        for r in (CROPS * batch, 2 * batch, n)
    )
    student.requires_grad_(grad)

    def step(fn):
        def run():
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                loss = fn(student, teacher, queue, TAU)
            if grad:
                student.grad = None
                loss.backward()
            return loss

        return run if grad else torch.no_grad()(run)

    err = (step(forced_triton(kernels.info_nce))() - step(kernels.info_nce_ref)()).abs().item()
    record = measure(step(forced_triton(kernels.info_nce)), step(kernels.info_nce_ref), repeats)
    record["memory_ratio"] = (
        None if record["triton_peak_mib"] is None else (record["torch_peak_mib"] / max(record["triton_peak_mib"], 1e-3))
    )
    shape = {
        "B": batch,
        "student": CROPS * batch,
        "teacher": 2 * batch,
        "N": n,
        "E": EMBED,
        "tau": TAU,
        "pass": "forward+backward" if grad else "forward (no_grad)",
    }
    return {"op": "info_nce", "shape": shape, **record, "max_abs_err": err}


def measure(triton_fn, torch_fn, repeats: int) -> dict:
    triton_ms, torch_ms = time_ms(triton_fn, repeats), time_ms(torch_fn, repeats)
    return {
        "triton_ms": triton_ms,
        "torch_ms": torch_ms,
        "speedup": torch_ms / triton_ms,
        "triton_peak_mib": peak_mib(triton_fn),
        "torch_peak_mib": peak_mib(torch_fn),
    }


def environment() -> dict:
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run(args: argparse.Namespace) -> list[dict]:
    n = 512 if args.quick else MEMORY_ROWS
    repeats = 1 if args.quick else args.repeats
    batches = [4] if args.quick else args.batches
    widths = [64] if args.quick else args.widths
    rate = bf16_matmul_tflops(256 if args.quick else 8192, repeats)
    env = environment()
    records = []
    for batch in batches:
        for dim in widths:
            for rows, rows_name in ((2 * batch, "2B teacher"), (CROPS * batch, "12B student")):
                records.append(bench_topk(batch, dim, rows, rows_name, n, rate, repeats))
        for grad in (True, False):
            records.append(bench_info_nce(batch, n, grad, repeats))
    for r in records:
        r.update(env, bf16_tflops=rate, target=TARGETS[r["op"]])
    return records


def save(records: list[dict], path: Path) -> None:
    """Replace earlier records of the same op, shape and device; keep the others."""
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["op"], json.dumps(r["shape"], sort_keys=True), r["device"]) for r in records}
    kept = [r for r in old if (r["op"], json.dumps(r["shape"], sort_keys=True), r["device"]) not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + records, indent=1) + "\n")


def table(records: list[dict]) -> str:
    def mib(x):
        return "-" if x is None else f"{x:.0f}"

    lines = [
        "| op | shape | Triton ms | PyTorch ms | speedup | Triton MiB | PyTorch MiB | floor ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items())
        floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-"
        lines.append(
            f"| {r['op']} | {shape} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | {r['speedup']:.2f} | "
            f"{mib(r['triton_peak_mib'])} | {mib(r['torch_peak_mib'])} | {floor} |"
        )
    env = records[0]
    lines.append(
        f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; "
        f"bf16 matmul {env['bf16_tflops']:.0f} TFLOP/s. PyTorch = bf16 matmul + torch.topk (top-k), "
        "the eager reference under bf16 autocast (InfoNCE)."
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if DEVICE != "cuda" and not args.quick:
        print("bench_kernels: needs a CUDA GPU (GPU numbers only); --quick runs a CPU smoke test", file=sys.stderr)
        return 2
    records = run(args)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        save(records, out)
        print(f"wrote {len(records)} records to {out}")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
