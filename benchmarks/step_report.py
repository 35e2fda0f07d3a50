"""The step benchmark's targets and its views: target verdicts (with what the profile blames), Markdown, bar chart.

Targets (issue 7, set for one H100): the end-to-end rate is at least 95% of the model-only rate (the data path
never makes the GPU wait), and ViT-S/16's model-only rate is at least 2,000 images/s. The absolute target is judged
only on an H100; the ratio on any GPU.
"""

import json
from collections.abc import Callable, Hashable
from pathlib import Path

import step_profile

END_TO_END_SHARE = 0.95
VIT_SMALL_IMG_S = 2000.0
TARGET_DEVICE = "H100"


def _verdict(name: str, value: float | None, required: float, spec: str, judged_on: str | None) -> dict:
    """A target's verdict: met True / False, or None with a note when it was not measured or is judged only on
    another kind of device (`judged_on`: None where this record's device is the right kind)."""
    verdict = {"target": name, "value": value, "required": required, "met": None}
    if value is None:
        verdict["note"] = "not measured"
    elif judged_on is not None:
        verdict["note"] = f"judged on {judged_on} only"
    else:
        verdict["met"] = value >= required
        if not verdict["met"]:
            got, need = format(value, spec), format(required, spec)
            verdict["missed_by"] = f"{100 * (1 - value / required):.1f}% ({got} where {need} is the target)"
    return verdict


def verdicts(record: dict, profiles: dict[str, dict]) -> list[dict]:
    """The targets that apply to a bench_step record; a missed one carries `blame`, from the profiles by mode
    (`model_only`, `end_to_end`: their step_profile summaries, when taken)."""
    on_target_device = TARGET_DEVICE in record["device"]
    model_only, end_to_end = record.get("model_only_img_s"), record.get("end_to_end_img_s")
    share = end_to_end / model_only if model_only and end_to_end is not None else None
    gpu = None if record["cuda"] else "a GPU"
    out = [_verdict("end to end >= 95% of model only", share, END_TO_END_SHARE, ".1%", gpu)]
    if record["arch"] == "vit_small":
        h100 = None if on_target_device else f"the {TARGET_DEVICE}"
        out.append(_verdict("ViT-S/16 model only >= 2,000 images/s", model_only, VIT_SMALL_IMG_S, ",.0f", h100))
    for v in out:
        if v["met"] is False:
            v["blame"] = _blame(v["target"], record, profiles)
    return out


def _blame(target: str, record: dict, profiles: dict[str, dict]) -> list[str]:
    if target.startswith("end to end"):
        said = [f"host inside the loader {100 * record['loader_wait_share']:.0f}% of the time"]
        if record.get("end_to_end_syncs_per_step"):
            said.append(f"{record['end_to_end_syncs_per_step']:g} host-GPU syncs per step (loader + step)")
        if "end_to_end" in profiles and "model_only" in profiles:
            said += step_profile.blame(profiles["end_to_end"], profiles["model_only"])
        return said
    said = [f"MFU {100 * record['mfu']:.1f}% of the measured peak"]
    if "model_only" in profiles:
        said += step_profile.blame(profiles["model_only"])
    return said


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(records: list[dict]) -> str:
    """Markdown table of bench_step records of one device, with their environment and the missed targets."""
    lines = [
        "| model | B / GPU | (a) model only img/s | MFU | (b) end to end img/s | (b)/(a) | (c) release's way img/s "
        "| (b)/(c) | host in loader | memory (a) GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        a, b, c = r.get("model_only_img_s"), r.get("end_to_end_img_s"), r.get("release_way_img_s")
        lines.append(
            f"| {r['arch']} | {r['batch_per_gpu']} | {_fmt(a)} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(b)} | "
            f"{_fmt(b / a if a and b else None, '.1%')} | {_fmt(c)} | {_speedup(b, c)} | "
            f"{_fmt(r.get('loader_wait_share'), '.1%')} | {_fmt(r.get('peak_memory_gib'), '.1f')} |"
        )
    r = records[0]
    lines += [
        "",
        f"{r['device']}; torch {r['torch']}, triton {r['triton']}, DALI {r.get('dali') or '-'}; {dates(records)}. "
        f"FLOPs per image: "
        + ", ".join(f"{x['arch']} {x['flops_per_image'] / 1e9:.1f} G" for x in _unique(records))
        + f"; MFU against the {r['peak_dtype']} matmul peak measured in the same run ({r['peak_tflops']:.3g} TFLOP/s).",
    ]
    misses = [(x, v) for x in records for v in x.get("targets", []) if v["met"] is False]
    for x, v in misses:
        lines.append(
            f"- **missed** {v['target']} ({x['arch']}, B = {x['batch_per_gpu']}): by {v['missed_by']}; "
            f"profile blames: {'; '.join(v['blame'])}"
        )
    for x in records:
        for mode, error in x.get("errors", {}).items():
            lines.append(f"- **failed** {mode.replace('_', ' ')} ({x['arch']}, B = {x['batch_per_gpu']}): {error}")
    met = [
        v["target"] + f" ({x['arch']}, B = {x['batch_per_gpu']})"
        for x in records
        for v in x.get("targets", [])
        if v["met"]
    ]
    if met:
        lines.append("- met: " + "; ".join(met))
    return "\n".join(lines)


def _speedup(fast: float | None, slow: float | None) -> str:
    return "-" if not (fast and slow) else f"{fast / slow:.1f}x"


def _unique(records: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in records:
        seen.setdefault(r["arch"], r)
    return list(seen.values())


def dates(records: list[dict]) -> str:
    """The date, or the range of dates, of a group of records (ISO strings: the day part)."""
    days = sorted({r["date"][:10] for r in records})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def chart(records: list[dict], path: Path) -> bool:
    """Grouped bars (a) / (b) / (c) per model and batch, images/s; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = [
        ("model_only_img_s", "(a) model only"),
        ("end_to_end_img_s", "(b) end to end, DALI"),
        ("release_way_img_s", "(c) release's way"),
    ]
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(records), 4.2))
    width = 0.8 / len(modes)
    for i, (key, label) in enumerate(modes):
        xs = [j + (i - 1) * width for j in range(len(records))]
        values = [r.get(key) or 0.0 for r in records]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[_fmt(r.get(key)) for r in records], fontsize=7, padding=2)
    if any(r["arch"] == "vit_small" for r in records):
        ax.axhline(VIT_SMALL_IMG_S, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate("ViT-S target (H100)", (-0.45, VIT_SMALL_IMG_S), fontsize=7, color="gray", va="bottom")
    speedups = [_speedup(r.get("end_to_end_img_s"), r.get("release_way_img_s")) for r in records]
    ticks = [f"{r['arch']}\nB = {r['batch_per_gpu']}\n(b)/(c) {x}" for r, x in zip(records, speedups, strict=True)]
    ax.set_xticks(range(len(records)), ticks)
    ax.set_ylabel("images / s (one GPU)")
    ax.set_title(f"Mugs training step, {records[0]['device']}, {dates(records)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def environment_key(record: dict) -> tuple:
    """Records with the same key were measured on the same device with the same software: one table each."""
    return (record["device"], record["torch"], record["triton"], record.get("dali"))


def group_by(records: list[dict], key: Callable[[dict], Hashable]) -> list[list[dict]]:
    """`records` split by `key`, groups and their records in first-seen order."""
    groups: dict[Hashable, list[dict]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


def size_rank(record: dict) -> tuple:
    """Sort key: model size, then batch."""
    rank = {"vit_tiny": 0, "vit_small": 1, "vit_base": 2, "vit_large": 3}
    return rank.get(record["arch"], 9), record["arch"], record["batch_per_gpu"]


def ordered(records: list[dict]) -> list[dict]:
    """By model size, then batch."""
    return sorted(records, key=size_rank)


def write_views(results: Path) -> None:
    """(Re)writes bench_step.md (a table per device and software), bench_step.png (the most recently measured
    group) and profile_step_<arch>.md from the JSON files in `results`."""
    path = results / "bench_step.json"
    if path.exists():
        groups = [ordered(g) for g in group_by(json.loads(path.read_text()), environment_key)]
        (results / "bench_step.md").write_text("\n\n".join(table(g) for g in groups) + "\n")
        latest = max(groups, key=lambda g: max(r["date"] for r in g))
        if not chart(latest, results / "bench_step.png"):
            print("bench_step.png not drawn: no matplotlib here (`benchmarks/run_all.py --readme-only` draws it)")
    for profile in sorted(results.glob("profile_step_*.json")):
        profile.with_suffix(".md").write_text(step_profile.markdown(json.loads(profile.read_text())))
