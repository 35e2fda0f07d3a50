"""Runs the step, kernel, loader, linear-probe and prep benchmarks, then regenerates the README's results section.

    python benchmarks/run_all.py                  # on a GPU machine: everything, within ~9.5 minutes on an H100
    python benchmarks/run_all.py --quick          # smoke run (CPU is fine): tiny sizes, a temporary results folder
    python benchmarks/run_all.py --readme-only    # README results section (and bench_step.md / .png) from the JSON

Two .beton files of ImageNet-like images (longer side <= 512) are made first: 4,000 images for the step benchmark,
whose end-to-end and release's-way runs need that many within one epoch, and 2,048 for the loader benchmark, which
reads its whole file with each of its three pipelines (the linear-probe benchmark reads the same file). Each
benchmark then runs as its own process with a time budget (step 330 s, kernels 120 s, loader 90 s, linear 60 s,
prep 60 s: sized for an H100, --time-scale stretches them), cut
further to fit the overall --deadline; the most telling runs first. A benchmark that needs CUDA is skipped, and
says so, on a machine without it (--quick runs the kernels under Triton's interpreter instead). What became of
each is written to <results>/run_all.json and printed last, with the step benchmark's table. --mirror DIR copies
the results (and the README section, as readme_results.md) to DIR after every benchmark, so a run cut short still
leaves what it measured there.

GPU run plan: one call on the lent GPU machine (/work/shared/GPU.md), once the DALI wheel parts are in .devwheels/
there; everything comes back under $OUT. Here, copy $OUT's *.json into benchmarks/results/ and run --readme-only
(it also draws bench_step.png when that machine had no matplotlib). As one line for the `run` tool:

    T0=$(date +%s); bash .devwheels/install.sh > $OUT/install.log 2>&1 || { tail -20 $OUT/install.log; exit 1; };
    export PYTHONPATH=/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1; PY=$(command -v python3 || command -v python);
    nvidia-smi > $OUT/nvidia-smi.txt 2>&1; $PY -c "import nvidia.dali as d; print('DALI', d.__version__)";
    $PY benchmarks/run_all.py --mirror $OUT --deadline $((580 - $(date +%s) + T0)) 2>&1 | tee $OUT/run_all.log
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import readme_results  # noqa: E402
from bench_step import make_beton  # noqa: E402

RESULTS = HERE / "results"
README = HERE.parent / "README.md"
MIN_BUDGET_S = 20  # a benchmark is not started with less time than this left
IMAGES = {"step": 4000, "loader": 2048, "linear": 2048}  # generated .beton sizes (one file per size)
QUICK_IMAGES = 48


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    budget_s: int
    needs_cuda: bool  # in a full run; every benchmark runs on a CPU with --quick

    def command(self, results: Path, betons: dict[str, Path], quick: bool) -> list[str]:
        """The benchmark's command line: full sizes, or the smallest that still exercise it."""
        script = str(HERE / self.script)
        if self.name == "step":
            args = ["--out", str(results), "--beton", str(betons["step"])] + (["--quick"] if quick else [])
        elif self.name == "kernels":
            args = ["--out", str(results / "bench_kernels.json")] + (["--quick"] if quick else [])
        elif self.name == "loader":
            args = [str(betons["loader"]), "--out", str(results / "bench_loader.json")]
            args += ["--batch-size", "4", "--gpu-batch-size", "8"] if quick else []
        elif self.name == "linear":
            args = [str(betons["linear"]), "--out", str(results / "bench_linear.json")] + (["--quick"] if quick else [])
        else:
            args = ["--out", str(results / "bench_prep.json")]
            args += ["--images", "12", "--repeats", "1", "--workers", "1"] if quick else []
        return [sys.executable, script, *args]


BENCHMARKS = (
    Benchmark("step", "bench_step.py", 330, needs_cuda=True),
    Benchmark("kernels", "bench_kernels.py", 120, needs_cuda=True),
    Benchmark("loader", "bench_loader.py", 90, needs_cuda=False),
    Benchmark("linear", "bench_linear.py", 60, needs_cuda=True),
    Benchmark("prep", "bench_prep.py", 60, needs_cuda=False),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, results in a temporary folder")
    p.add_argument("--readme-only", action="store_true", help="only regenerate the README section from the JSON")
    p.add_argument("--results", type=Path, help=f"results folder (default {RESULTS}; --quick: a temporary one)")
    p.add_argument("--readme", type=Path, help=f"README to update (default {README}; --quick: none)")
    p.add_argument("--beton", type=Path, help="a .beton for the step and loader benchmarks (default: generate two)")
    p.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="run only these benchmarks")
    p.add_argument("--deadline", type=float, default=570, help="seconds for the whole run (default 570)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every benchmark's budget (slower GPU: 2 or more)"
    )
    p.add_argument("--mirror", type=Path, help="copy the results here after every benchmark (e.g. $OUT)")
    args = p.parse_args(argv)
    if args.beton is not None and not args.beton.is_file():
        p.error(f"no .beton file at {args.beton}")
    if args.readme is not None and not args.readme.is_file():
        p.error(f"no README at {args.readme}")
    if args.deadline <= 0 or args.time_scale <= 0:
        p.error("--deadline and --time-scale must be positive")
    if args.readme_only and (args.quick or args.only or args.beton or args.mirror):
        p.error("--readme-only runs nothing: it takes only --results and --readme")
    return args


def run_benchmark(command: list[str], timeout: float) -> str:
    """Runs `command` in its own process group (its output goes straight to ours); its outcome in a few words."""
    print(f"\n$ {' '.join(command)}  (budget {timeout:.0f} s)", flush=True)
    process = subprocess.Popen(command, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the benchmark and the workers it started
        process.wait()
        return f"stopped after its budget of {timeout:.0f} s"
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return "ok" if code == 0 else f"failed (exit status {code})"


def mirror(results: Path, readme_block: str, dst: Path | None) -> None:
    """Copies the results' files (JSON, Markdown, charts) and the README section to `dst`."""
    if dst is None:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in results.iterdir():
        if f.suffix in (".json", ".md", ".png") and f.is_file():
            shutil.copy2(f, dst / f.name)
    (dst / "readme_results.md").write_text(readme_block + "\n")


def skip_reason(bench: Benchmark, args: argparse.Namespace) -> str | None:
    """Why `bench` is not run at all here (None when it is)."""
    if args.only and bench.name not in args.only:
        return "not asked for"
    if bench.needs_cuda and not args.quick and not torch.cuda.is_available():
        return "needs a CUDA GPU (no CUDA here)"
    return None


def run_all(args: argparse.Namespace, results: Path, betons: dict[str, Path], started: float) -> list[dict]:
    """Each benchmark in turn, within its budget and the deadline; what became of each."""
    outcomes = []
    for bench in BENCHMARKS:
        reason = skip_reason(bench, args)
        if reason == "not asked for":
            continue
        left = args.deadline - (time.monotonic() - started)
        t0 = time.monotonic()
        if reason is not None:
            outcome = f"skipped: {reason}"
        elif left < MIN_BUDGET_S:
            outcome = f"skipped: {left:.0f} s left of the deadline"
        else:
            budget = min(bench.budget_s * args.time_scale, left)
            outcome = run_benchmark(bench.command(results, betons, args.quick), budget)
        print(f"[run_all] {bench.name}: {outcome}", flush=True)
        outcomes.append({"benchmark": bench.name, "outcome": outcome, "seconds": round(time.monotonic() - t0, 1)})
        mirror(results, readme_results.render(results, README.parent), args.mirror)
    return outcomes


def make_betons(tmp: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The .beton of each benchmark that will run and reads one: --beton, or generated (one small one with
    --quick, shared)."""
    readers = [b.name for b in BENCHMARKS if b.name in IMAGES and skip_reason(b, args) is None]
    if args.beton is not None or not readers:
        return dict.fromkeys(readers, args.beton)
    betons, by_size = {}, {}
    for name in readers[:1] if args.quick else readers:
        images = QUICK_IMAGES if args.quick else IMAGES[name]
        if images not in by_size:
            print(f"[run_all] making a .beton of {images} ImageNet-like images for the {name} benchmark", flush=True)
            by_size[images] = make_beton(tmp / f"{name}.beton", images, len(os.sched_getaffinity(0)))
        betons[name] = by_size[images]
    return {name: betons.get(name, betons[readers[0]]) for name in readers}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or (Path(tempfile.mkdtemp(prefix="run_all-")) if args.quick else RESULTS)
    readme = args.readme or (None if args.quick else README)
    if args.readme_only:
        try:
            changed = readme_results.regenerate(results, readme)
        except readme_results.MarkerError as e:
            print(f"run_all: {e}", file=sys.stderr)
            return 1
        print(f"{readme}: results section {'updated' if changed else 'already up to date'}")
        return 0

    started = time.monotonic()
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run_all-") as tmp:
        betons = make_betons(Path(tmp), args)
        outcomes = run_all(args, results, betons, started)
    return finish(args, results, readme, outcomes, started)


def finish(args: argparse.Namespace, results: Path, readme: Path | None, outcomes: list[dict], started: float) -> int:
    """Writes run_all.json, the README section (into `readme`, or beside the results), prints the summary."""
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "benchmarks": outcomes,
    }
    (results / "run_all.json").write_text(json.dumps(summary, indent=1) + "\n")
    block = readme_results.render(results, (readme or results / "README.md").parent)
    if readme is not None:
        try:
            readme_results.regenerate(results, readme)
        except readme_results.MarkerError as e:
            print(f"run_all: README not updated: {e}", file=sys.stderr)
    else:
        (results / "readme_results.md").write_text(block + "\n")
    mirror(results, block, args.mirror)
    print(f"\n[run_all] {summary['seconds']:.0f} s on {summary['device']}; results in {results}")
    for o in outcomes:
        print(f"  {o['benchmark']:<8} {o['seconds']:>6.1f} s  {o['outcome']}")
    step_md = results / "bench_step.md"
    if step_md.exists():
        print("\n" + step_md.read_text())
    return 0 if all(o["outcome"] == "ok" or o["outcome"].startswith("skipped: needs") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
