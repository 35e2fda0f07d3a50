"""What a run reports: a progress bar, a metrics line every `log_freq` steps (stdout and metrics.jsonl),
TensorBoard events when tensorboard is installed, and the run's identity (resolved config, code version).

Per step the logger only adds the step's loss tensors into a device-side sum (no host sync); the sums are
all-reduced and read once per logging interval.
"""

import json
import math
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mugs_fast.config import MugsConfig
from mugs_fast.distributed import all_reduce_mean, get_world_size
from mugs_fast.files import atomic_path

SCHEDULE_KEYS = ("lr", "wd", "momentum", "teacher_temp")
SHORT_NAMES = {"instance-sup.": "instance", "local-group-sup.": "local-group", "group-sup.": "group"}
SIGNAL_NAMES = {  # the collapse monitor's (mugs_fast.monitor)
    "embedding_std": "emb-std",
    "group_entropy": "group-entropy",
    "group_row_entropy": "row-entropy",
    "group_agreement": "agreement",
}


def code_version() -> dict[str, Any]:
    """The package version, and the git commit and dirty flag when the code runs from a git checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        package = metadata.version("mugs-fast")
    except metadata.PackageNotFoundError:
        package = None
    version: dict[str, Any] = {"package": package, "commit": None, "dirty": None}
    try:
        git = lambda *args: subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        version["commit"] = git("rev-parse", "HEAD")
        version["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package), or no git
    return version


def write_run_info(output_dir: Path, cfg: MugsConfig, version: dict[str, Any], world_size: int) -> None:
    """config.json (the resolved config, loadable with MugsConfig.from_json) and run.json (code, launch)."""
    (output_dir / "config.json").write_text(cfg.to_json() + "\n")
    info = {
        "version": version,
        "command": sys.argv,
        "world_size": world_size,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (output_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def _tensorboard_writer(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


class MetricLogger:
    """Training metrics of every rank, printed and written by rank 0 (`enabled`).

    step(): per optimiser step, device-side accumulation only. log(): every rank, at the logging interval;
    all-reduces the sums (a collective) and syncs once; rank 0 prints a line and appends to metrics.jsonl.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        global_batch: int,
        log_freq: int,
        device: torch.device,
        enabled: bool,
    ) -> None:
        self.output_dir, self.global_batch, self.log_freq = output_dir, global_batch, max(1, log_freq)
        self.device, self.enabled, self.total_steps = device, enabled, total_steps
        self._keys: list[str] = []
        self._sum: torch.Tensor | None = None
        self._count, self._data_seconds, self._since = 0, 0.0, time.perf_counter()
        self._schedule: dict[str, float] = {}
        self.bar = tqdm(
            total=total_steps * global_batch,
            initial=start_step * global_batch,
            unit="img",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not enabled,
        )
        if enabled:
            _drop_records_after(output_dir / "metrics.jsonl", start_step)
        self._jsonl = open(output_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 - closed in close()
        self._tb = _tensorboard_writer(output_dir) if enabled else None

    def step(self, metrics: dict[str, torch.Tensor | float], data_seconds: float) -> None:
        """Adds one step's metrics (loss tensors summed on the device; schedule values kept as they are)."""
        if not self._keys:
            self._keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        values = torch.stack([metrics[k].float() for k in self._keys])  # (M,)
        self._sum = values if self._sum is None else self._sum + values
        self._schedule = {k: float(metrics[k]) for k in SCHEDULE_KEYS}
        self._count += 1
        self._data_seconds += data_seconds
        self.bar.update(self.global_batch)

    def ends_interval(self, step: int) -> bool:
        """Whether step `step` (0-based index) is the last of a logging interval."""
        return (step + 1) % self.log_freq == 0

    def due(self, step: int) -> bool:
        """Whether the step just done (0-based index) ends a logging interval."""
        return self.ends_interval(step) and self._count > 0

    def log(
        self, step: int, epoch: int, replaced_samples: int = 0, snapshot: dict[str, torch.Tensor] | None = None
    ) -> dict[str, Any] | None:
        """Closes the interval ending with step `step` (0-based): every rank must call it. Returns the record.

        replaced_samples: this rank's count of undecodable samples its loader replaced so far (summed over ranks).
        snapshot: 0-d device tensors measured on one step (the collapse signals), the same keys on every rank:
        logged as they are, averaged over ranks.
        """
        if self._count == 0:
            return None
        # one collective and one host sync per interval: the snapshot and the count ride along with the means
        snapshot = snapshot or {}
        values = [v.float().reshape(1) for v in snapshot.values()]
        local = torch.cat([self._sum / self._count, *values, self._sum.new_tensor([replaced_samples])])
        means = all_reduce_mean(local).tolist()
        replaced = round(means.pop() * get_world_size())
        seconds = time.perf_counter() - self._since
        means, snapped = means[: len(self._keys)], means[len(self._keys) :]
        record: dict[str, Any] = {"step": step + 1, "epoch": epoch, **dict(zip(self._keys, means, strict=True))}
        record.update(zip(snapshot, snapped, strict=True))
        record.update(self._schedule)
        record["images_per_s"] = self._count * self.global_batch / seconds
        record["data_wait"] = self._data_seconds / seconds
        record["replaced_samples"] = replaced
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._sum, self._count, self._data_seconds, self._since = None, 0, 0.0, time.perf_counter()
        if self.enabled:
            self._write(record, prefix="train")
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            self.bar.write(format_record(record, self.total_steps))
        return record

    def warn(self, message: str) -> None:
        """A one-line warning on stderr, between progress-bar updates (rank 0)."""
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def log_eval(self, step: int, epoch: int, name: str, results: dict[str, Any]) -> None:
        """An evaluation result (e.g. kNN accuracies) into metrics.jsonl, TensorBoard and stdout (rank 0)."""
        if not self.enabled:
            return
        self._write({"step": step, "epoch": epoch, name: results}, prefix=name)
        self.bar.write(f"[{name}] epoch {epoch}: " + json.dumps(results))

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in _flatten(record).items():
                if key not in ("step", "epoch") and isinstance(value, float | int) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: forget what the stopped run logged for them.

    Lines that are not records (the partial last line of a write cut short by a node crash, a damaged line in
    the middle) are dropped with a warning that names them, so that the file stays valid JSON lines and the next
    record starts on a line of its own. The file is replaced atomically.
    """
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    kept, damaged = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): a damaged line may hold \r or \x1c
        record = _parse_record(line)
        if record is None and line.strip():
            damaged.append(number)
        elif record is not None and record["step"] <= step:
            kept.append(line + "\n")
    if damaged:
        where = "the last line, a partial write" if damaged == [text.count("\n") + 1] else f"lines {damaged}"
        warnings.warn(f"{path}: dropped {len(damaged)} damaged line(s) ({where})", RuntimeWarning, stacklevel=3)
    if "".join(kept) != text:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))


def _parse_record(line: str) -> dict[str, Any] | None:
    """The record a metrics.jsonl line holds, or None (not JSON, or not a record with an integer step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_record(r: dict[str, Any], total_steps: int) -> str:
    """One console line of a training record."""
    losses = " ".join(f"{SHORT_NAMES[k]} {r[k]:.4f}" for k in SHORT_NAMES if k in r)
    line = (
        f"step {r['step']}/{total_steps} epoch {r['epoch']} | loss {r['loss']:.4f} ({losses}) | "
        f"lr {r['lr']:.3g} wd {r['wd']:.3g} momentum {r['momentum']:.5f} teacher_temp {r['teacher_temp']:.3f} | "
        f"{r['images_per_s']:.0f} img/s, data wait {100 * r['data_wait']:.0f}%"
    )
    signals = " ".join(f"{name} {r[k]:.3g}" for k, name in SIGNAL_NAMES.items() if k in r)
    if signals:
        line += f" | {signals}"
    if "peak_mem_gib" in r:
        line += f" | peak mem {r['peak_mem_gib']:.1f} GiB"
    if r.get("replaced_samples"):
        line += f" | {r['replaced_samples']} undecodable samples replaced"
    return line


def knn_per_epoch(records: list[dict[str, Any]], k: str = "20") -> list[dict[str, float]]:
    """The kNN top-1 (%) of each evaluation in a run's metrics.jsonl records, as [{"epoch": epochs trained, "top1"}]."""
    return [{"epoch": r["epoch"] + 1, "top1": r["knn"]["k"][k]["top1"]} for r in records if "knn" in r]


def plot_learning_curves(
    metrics_jsonl: Path, png: Path, *, initial_knn: float | None = None, k: str = "20", title: str = "Mugs run"
) -> Path:
    """One figure of a run's metrics.jsonl: the losses against the step (left) and the kNN top-1 at the end of
    each evaluated epoch (right), from `initial_knn` (the network at initialisation, at epoch 0) when given."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    fig = Figure(figsize=(11, 4))
    losses, accuracy = fig.subplots(1, 2)
    for key, label in (("loss", "total"), *SHORT_NAMES.items()):
        if train and key in train[0]:
            losses.plot([r["step"] for r in train], [r[key] for r in train], label=label)
    losses.set(xlabel="step", ylabel="loss", title=f"{title}: training losses")
    losses.legend()
    points = [{"epoch": 0, "top1": initial_knn}] if initial_knn is not None else []
    points += knn_per_epoch(records, k)
    if points:
        accuracy.plot([p["epoch"] for p in points], [p["top1"] for p in points], marker="o")
    accuracy.set(xlabel="epochs trained", ylabel="top-1 (%)", title=f"kNN on the val set (k={k})")
    accuracy.xaxis.get_major_locator().set_params(integer=True)
    for ax in (losses, accuracy):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png
