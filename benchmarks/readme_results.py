"""The README's results section, generated from the benchmarks' JSON records.

README.md holds the two marker lines `<!-- results:start -->` and `<!-- results:end -->`; `update_readme` replaces
what is between them with `render(results_dir)` and leaves every other byte alone (running it twice changes
nothing). Each table holds one benchmark's records of one machine and software stack and is labelled with them and
the dates: numbers from different devices never share a table, and every ratio in a table was measured side by side
in one run. Smoke-run records (`"quick": true`) and kernel timings taken without a GPU are left out.
"""

import json
import os
from pathlib import Path

import step_report
from bench_linear import table as linear_table
from bench_loader import table as loader_table

START = "<!-- results:start -->"
END = "<!-- results:end -->"
PROFILE_COLUMNS = ("GEMM", "attention", "InfoNCE", "top-k", "optimizer/EMA", "softmax", "data (DALI)", "GPU idle")


class MarkerError(ValueError):
    """The README lacks the results markers, or has them more than once or in the wrong order."""


def _without_commit(versions: dict) -> str:
    return json.dumps({k: v for k, v in versions.items() if k != "mugs_fast_commit"}, sort_keys=True)


def _commits(records: list[dict]) -> str:
    commits = sorted({r["versions"].get("mugs_fast_commit", "?") for r in records})
    return f"commit {', '.join(commits)}"


def _loader_input(source: dict) -> str:
    if "images" in source:
        return f"{source['images']} generated JPEGs of ~{source['mean_size']} px, {source['mean_kb']} KB"
    return "a given .beton"


def step_section(records: list[dict], results: Path, link: str) -> str:
    """bench_step: a table per device and software, the chart, and the profiles' category shares."""
    parts = [
        step_report.table(step_report.ordered(g)) for g in step_report.group_by(records, step_report.environment_key)
    ]
    if (results / "bench_step.png").exists():
        parts.append(f"![images/s of the Mugs step]({link}/bench_step.png)")
    profiles = [p for f in sorted(results.glob("profile_step_*.json")) for p in json.loads(f.read_text())]
    profiles = [p for p in profiles if not p.get("quick")]
    if profiles:
        parts.append(profile_table(profiles, results, link))
    return "\n\n".join(parts)


def profile_table(profiles: list[dict], results: Path, link: str) -> str:
    """Shares of the GPU span by kernel category, one row per model, batch and mode, a table per device."""
    out = []
    for group in step_report.group_by(profiles, lambda p: (p["device"], p["torch"], p["triton"])):
        head = "| model | B | run | ms / step | " + " | ".join(PROFILE_COLUMNS) + " | rest |"
        lines = ["Where the GPU time goes (share of the profiled span, `benchmarks/step_profile.py`):", "", head]
        lines.append("|---|---:|---|---:|" + "---:|" * (len(PROFILE_COLUMNS) + 1))
        modes = {"model_only": 0, "end_to_end": 1}
        for p in sorted(group, key=lambda p: (step_report.size_rank(p), modes.get(p["mode"], 2))):
            shares = [p["categories"].get(c, {"share": 0.0})["share"] for c in PROFILE_COLUMNS]
            rest = sum(v["share"] for c, v in p["categories"].items() if c not in PROFILE_COLUMNS)
            cells = " | ".join(f"{100 * s:.0f}%" for s in [*shares, rest])
            mode = p["mode"].replace("_", " ")
            lines.append(f"| {p['arch']} | {p['batch_per_gpu']} | {mode} | {p['span_ms_per_step']:.1f} | {cells} |")
        g = group[0]
        files = sorted(results.glob("profile_step_*.json"))
        links = ", ".join(
            f"[{f.stem.removeprefix('profile_step_')}]({link}/{f.with_suffix('.md').name})" for f in files
        )
        when = step_report.dates(group)
        lines += ["", f"{g['device']}, torch {g['torch']}, triton {g['triton']}; {when}. Top kernels: {links}."]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def kernels_section(records: list[dict], results: Path, link: str) -> str:
    """bench_kernels: Triton against eager PyTorch per op and shape, a table per device and software."""
    out = []
    for group in step_report.group_by(records, lambda r: (r["device"], r["torch"], r["triton"])):
        lines = [
            "| op | shape | Triton ms | PyTorch ms | speed-up | floor ratio | memory ratio |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in group:
            shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items())
            floor = f"{r['floor_ratio']:.2f}" if r.get("floor_ratio") is not None else "-"
            memory = f"{r['memory_ratio']:.0f}x" if r.get("memory_ratio") is not None else "-"
            lines.append(
                f"| {r['op']} | {shape} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | {r['speedup']:.1f}x | "
                f"{floor} | {memory} |"
            )
        g = group[0]
        lines += [
            "",
            f"{g['device']}, torch {g['torch']}, triton {g['triton']}; {step_report.dates(group)}; bf16 matmul "
            f"{g['bf16_tflops']:.0f} TFLOP/s measured in the same run (the floor). Targets: "
            + "; ".join(f"{op}: {t}" for op, t in sorted({(r["op"], r["target"]) for r in group}))
            + ".",
        ]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def loader_section(records: list[dict], results: Path, link: str) -> str:
    """bench_loader: the multi-crop pipelines, a table per machine and software."""
    key = lambda r: (r["machine"]["cpu"], r["machine"]["usable_cores"], _without_commit(r["versions"]))
    out = []
    for group in step_report.group_by(records, key):
        g, versions = group[0], group[0]["versions"]
        gpus = sorted({r["device"] for r in group if r["pipeline"] == "dali-gpu"})
        stack = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "mugs_fast_commit")
        inputs = sorted(
            {f"{r['input'].get('images', '?')} images of ~{r['input'].get('mean_size', '?')} px" for r in group}
        )
        out.append(
            loader_table(group)
            + f"\n\n{g['machine']['cpu']} ({g['machine']['usable_cores']} cores)"
            + (f", {', '.join(gpus)}" if gpus else "")
            + f"; {stack}; {_commits(group)}; {step_report.dates(group)}; {'; '.join(inputs)}; "
            f"load average before: {', '.join(str(r['load_average_before']) for r in group)}."
        )
    return "\n\n".join(out)


def prep_section(records: list[dict], results: Path, link: str) -> str:
    """bench_prep: conversion speed by tool and worker count, a table per machine and software."""
    key = lambda r: (r["machine"]["cpu"], r["machine"]["usable_cores"], _without_commit(r["versions"]))
    out = []
    for group in step_report.group_by(records, key):
        lines = [
            "| tool | images | workers | images/s | per worker | per CPU-second | stored as-is |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in group:
            for x in r["results"]:
                as_is = f"{x['stored_as_is_share']:.0%}" if "stored_as_is_share" in x else "-"
                lines.append(
                    f"| {x['tool']} | {r['input']['images']} | {x['workers']} | {x['images_per_s']:,} | "
                    f"{x['images_per_s_per_worker']:,} | {x['images_per_cpu_s']:,} | {as_is} |"
                )
        g = group[0]
        stack = ", ".join(f"{k} {v}" for k, v in g["versions"].items() if k != "mugs_fast_commit")
        large = g["input"].get("larger_than_512_share")
        mix = f" ({large:.0%} larger than 512 px)" if large is not None else ""
        lines += [
            "",
            f"{g['machine']['cpu']} ({g['machine']['usable_cores']} cores); {stack}; {_commits(group)}; "
            f"{step_report.dates(group)}; JPEGs of ~{g['input']['mean_size']} px, {g['input']['mean_kb']} KB{mix}; "
            f"load average before: {', '.join(str(r['load_average_before'][0]) for r in group)}.",
        ]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def linear_section(records: list[dict], results: Path, link: str) -> str:
    """bench_linear: extraction images/s, the sweep's cost, the ImageNet-1k estimate; a table per device."""
    out = []
    for group in step_report.group_by(records, lambda r: (r["device"], _without_commit(r["versions"]))):
        g = group[0]
        stack = ", ".join(f"{k} {v}" for k, v in g["versions"].items() if k != "mugs_fast_commit")
        targets = "; ".join(
            f"{t['target']}: {'met' if t['met'] else 'missed' if t['met'] is False else 'not judged here'}"
            for t in g["targets"]
        )
        out.append(
            linear_table(group)
            + f"\n\n{g['device']}, {g['machine']['usable_cores']} CPU cores; {stack}; {_commits(group)}; "
            f"{step_report.dates(group)}; {g['input']['images']} images; "
            f"load average before: {', '.join(str(r['load_average_before']) for r in group)}. Targets: {targets}."
        )
    return "\n\n".join(out)


SECTIONS = (
    ("Training step: model only, end to end, the release's way", "bench_step.json", step_section),
    ("Kernels: cosine top-k and InfoNCE", "bench_kernels.json", kernels_section),
    ("Multi-crop loading", "bench_loader.json", loader_section),
    ("Linear probe: feature extraction and sweep", "bench_linear.json", linear_section),
    ("Data preparation", "bench_prep.json", prep_section),
)


def published(name: str, record: dict) -> bool:
    """Smoke-run records are not results; nor are kernel timings taken off a GPU (Triton's interpreter)."""
    return not record.get("quick") and not (name == "bench_kernels.json" and record["device"].startswith("cpu"))


def render(results: Path, readme_dir: Path) -> str:
    """The Markdown of the results section: one sub-section per benchmark with published (non-smoke) records.

    Links (chart, profiles) are relative to `readme_dir`, where the README lives."""
    link = Path(os.path.relpath(results, readme_dir)).as_posix()
    sections = [
        "<!-- generated by `python benchmarks/run_all.py --readme-only` from benchmarks/results/*.json: "
        "edits here are overwritten -->"
    ]
    for title, name, section in SECTIONS:
        path = results / name
        records = [r for r in json.loads(path.read_text()) if published(name, r)] if path.exists() else []
        if records:
            sections.append(f"### {title}\n\n{section(records, results, link)}")
    if len(sections) == 1:
        sections.append("No results yet: `python benchmarks/run_all.py` measures them.")
    return "\n\n".join(sections)


def update_readme(readme: Path, block: str) -> bool:
    """Replaces what lies between the results markers of `readme` with `block`; True if the file changed.

    Raises MarkerError unless the file has each marker exactly once, start before end."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise MarkerError(f"{readme}: needs one line '{START}' and, after it, one line '{END}'")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = f"{head}{START}\n{block.strip()}\n{END}{tail}"
    if new == text:
        return False
    readme.write_text(new)
    return True


def regenerate(results: Path, readme: Path) -> bool:
    """The step benchmark's Markdown and chart, then the README's results section, from the JSON in `results`."""
    step_report.write_views(results)
    return update_readme(readme, render(results, readme.parent))
