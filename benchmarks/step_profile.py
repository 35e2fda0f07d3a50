"""Where the GPU time of a Mugs step goes: torch.profiler kernel times over a few steps, grouped by kernel name.

Each kernel (and device copy) goes to the first category whose pattern occurs in its name (case-insensitive regular
expressions, `CATEGORIES` below, in this order):
    data (DALI)         DALI's decode and crop kernels (end-to-end runs)
    InfoNCE             the Triton InfoNCE kernels (kernels/info_nce.py)
    top-k               the Triton search, torch.topk merges, the memory write's argsort
    attention           flash / memory-efficient / cuDNN attention, forward and backward
    optimizer/EMA       fused AdamW, the clipping norms and scales, the EMA (foreach kernels)
    GEMM                cuBLAS / cuDNN matmuls and the patch-embedding convolution
    softmax             mostly the group loss over its 65,536 prototypes
    norm                LayerNorm forward and backward
    elementwise/reduce  element-wise, reduction, indexing, concatenation kernels
    memcpy/memset       device copies and fills (trace categories gpu_memcpy / gpu_memset)
    other               everything else
Order matters: cuDNN's attention kernels also say "wgmma", the LayerNorm kernels "vectorized".

GPU idle is the part of the profiled span (first kernel start to last kernel end) during which no kernel or copy
runs on any stream. In the end-to-end run, idle time beyond the model-only run's is the step waiting for data
(or for the host). Shares are of the span; with overlapping streams (DALI beside the step) they may add up to
more than 1.
"""

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CATEGORIES: tuple[tuple[str, str], ...] = (
    ("data (DALI)", r"dali|nvjpeg"),
    ("InfoNCE", r"info_nce"),
    ("top-k", r"topk|top_k|sort"),
    ("attention", r"flash|fmha|attention|sdpa|attn"),
    ("optimizer/EMA", r"multi_tensor_apply|adam|lpnorm|foreach"),
    ("GEMM", r"gemm|gemv|xmma|cutlass|nvjet|cublas|wgmma|hmma|s16816|splitk|matmul"),
    ("softmax", r"softmax|logsumexp"),
    ("norm", r"layer_norm|layernorm|gammabeta|batch_norm"),
    ("elementwise/reduce", r"elementwise|reduce|vectorized|unrolled|index|cat|copy|fill|gelu|dropout|where|cub::"),
    ("memcpy/memset", r"^memcpy|^memset"),
)
IDLE = "GPU idle"
OTHER = "other"
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES)
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of device activity


@dataclass(frozen=True)
class Kernel:
    """One device activity from a trace: times in microseconds."""

    name: str
    start: float
    duration: float
    stream: int | str

    @property
    def end(self) -> float:
        return self.start + self.duration


def categorize(name: str) -> str:
    """The category of a kernel name (see the module docstring)."""
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return OTHER


def kernels_from_trace(trace: dict) -> list[Kernel]:
    """The kernels, copies and fills of a chrome trace (torch.profiler's `export_chrome_trace` JSON; older Kineto
    versions spell the category `Kernel` and name the stream only in `tid`)."""
    return [
        Kernel(e["name"], float(e["ts"]), float(e["dur"]), e.get("args", {}).get("stream", e.get("tid", 0)))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and str(e.get("cat", "")).lower() in DEVICE_EVENTS
    ]


def busy_time(kernels: list[Kernel]) -> float:
    """Microseconds during which at least one of `kernels` runs (the union of their intervals)."""
    busy, current_start, current_end = 0.0, None, None
    for k in sorted(kernels, key=lambda k: k.start):
        if current_end is None or k.start > current_end:
            busy += 0.0 if current_end is None else current_end - current_start
            current_start, current_end = k.start, k.end
        else:
            current_end = max(current_end, k.end)
    return busy + (0.0 if current_end is None else current_end - current_start)


def summarize(kernels: list[Kernel], steps: int, top: int = 12) -> dict:
    """Per-step milliseconds and span shares by category (GPU idle included), and the top kernels by time."""
    if not kernels:
        raise ValueError("the profile holds no GPU kernels: was it taken on a CUDA device?")
    span = max(k.end for k in kernels) - min(k.start for k in kernels)
    by_category: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for k in kernels:
        category = categorize(k.name)
        by_category[category] = by_category.get(category, 0.0) + k.duration
        entry = by_name.setdefault(k.name, [0.0, 0, category])
        entry[0] += k.duration
        entry[1] += 1
    by_category[IDLE] = span - busy_time(kernels)
    per_step = lambda us: round(us / steps / 1e3, 3)
    categories = {
        c: {"ms_per_step": per_step(us), "share": round(us / span, 4)}
        for c, us in sorted(by_category.items(), key=lambda kv: -kv[1])
    }
    top_kernels = [
        {"name": name, "category": c, "ms_per_step": per_step(us), "calls_per_step": round(n / steps, 2)}
        for name, (us, n, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    ]
    return {"steps": steps, "span_ms_per_step": per_step(span), "categories": categories, "top_kernels": top_kernels}


def capture(run_step: Callable[[], object], steps: int) -> list[Kernel]:
    """The device activity of `steps` calls of `run_step` on the current CUDA device (synchronised at the end)."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()  # sync: the last step's kernels belong to the profile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return kernels_from_trace(json.loads(path.read_text()))


def blame(profile: dict, baseline: dict | None = None, count: int = 3) -> list[str]:
    """What a profile says costs the most: its largest categories, or with a `baseline` profile (the model-only
    run, for an end-to-end one) the categories that grew the most per step."""
    cats = profile["categories"]
    if baseline is None:
        ranked = sorted(cats.items(), key=lambda kv: -kv[1]["ms_per_step"])[:count]
        return [f"{c} {v['ms_per_step']:.1f} ms/step ({100 * v['share']:.0f}%)" for c, v in ranked]
    base = baseline["categories"]
    growth = {c: v["ms_per_step"] - base.get(c, {"ms_per_step": 0.0})["ms_per_step"] for c, v in cats.items()}
    ranked = sorted(growth.items(), key=lambda kv: -kv[1])[:count]
    return [f"{c} +{ms:.1f} ms/step over model only" for c, ms in ranked if ms > 0]


def markdown(profiles: list[dict]) -> str:
    """Short Markdown of profile records (one per arch, batch and mode): category table and top kernels."""
    lines = []
    for p in profiles:
        lines += [
            f"### {p['arch']}, B = {p['batch_per_gpu']}, {p['mode'].replace('_', ' ')}",
            "",
            f"{p['device']}, torch {p['torch']}, triton {p['triton']}, {p['date']}; {p['steps']} steps, "
            f"{p['span_ms_per_step']:.1f} ms of GPU span per step.",
            "",
            "| category | ms / step | share of span |",
            "|---|---:|---:|",
        ]
        lines += [f"| {c} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% |" for c, v in p["categories"].items()]
        lines += ["", "| top kernels | category | ms / step | calls / step |", "|---|---|---:|---:|"]
        for k in p["top_kernels"]:
            name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
            name = name.replace("|", "\\|")
            lines.append(f"| `{name}` | {k['category']} | {k['ms_per_step']:.2f} | {k['calls_per_step']:g} |")
        lines.append("")
    return "\n".join(lines)
