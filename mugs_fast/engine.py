"""The training loop: `train(cfg)` runs, or resumes, a Mugs pretraining run in `cfg.output_dir`.

One process per GPU (torchrun), or one or more CPU processes. Every step is `mugs.train_step` on a batch of
the DALI multi-crop loader (`--data_path`) or of GPU-resident random crops (`--synthetic`). The host syncs
with the GPU only at the logging interval, at checkpoints and at evaluations; host-side votes between ranks
(stop, checkpoint time) go over gloo and never wait for the GPU.

Re-running the same command resumes from `output_dir/checkpoint.pth` where it stopped, mid-epoch included,
and continues exactly as if it had not stopped (same batches, augmentations and random numbers).

`main` is the command line (`mugs-train`, `python train.py`, `python -m mugs_fast.engine`). Exit status: 0
finished or reached --max_steps, 1 error (one line on stderr), 2 usage, 130 / 143 stopped by SIGINT / SIGTERM
after writing a checkpoint.
"""

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mugs_fast.checkpoint import (
    CHECKPOINT_NAME,
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    remove_stale_temporaries,
    restore_training_state,
)
from mugs_fast.config import MugsConfig, output_dir_problem, parse_config
from mugs_fast.data.beton import BetonError, BetonReader
from mugs_fast.data.contract import CropSpec, MultiCropSource
from mugs_fast.distributed import settle
from mugs_fast.knn import DatasetMismatch, check_knn_datasets, evaluate_knn, knn_temperature
from mugs_fast.metrics import MetricLogger, code_version, plot_learning_curves, write_run_info
from mugs_fast.monitor import CollapseMonitor
from mugs_fast.mugs import Mugs, train_step
from mugs_fast.optim import Schedules, build_optimizer, build_schedules
from mugs_fast.runtime import (
    RunLock,
    Runtime,
    StopSignal,
    collective_failure,
    init_runtime,
    seed_everything,
    shutdown,
)

# Fields that may change between a run and its resumption: how it is driven, not what it computes.
RUN_CONTROL_FIELDS = frozenset(
    {"max_steps", "output_dir", "data_path", "val_path", "log_freq", "checkpoint_minutes", "knn_freq", "compile"}
    | {"linear_eval"}
    | {"num_workers", "recipe", "collective_timeout_minutes"}
)


class TrainError(Exception):
    """A run that cannot start or go on (bad input, an incompatible run directory, a non-finite loss)."""


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    total_steps: int  # steps this command was asked to reach
    stopped_by: str  # "done", "max_steps", or the signal's name ("SIGTERM", "SIGINT")
    checkpoint: Path | None
    knn: dict[str, Any] | None = None  # the last kNN evaluation


@dataclass
class Run:
    """Everything the loop touches."""

    cfg: MugsConfig
    rt: Runtime
    loader: MultiCropSource
    model: Mugs
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    saver: Checkpointer
    logger: MetricLogger
    stop: StopSignal
    knn: dict[str, Any] | None = field(default=None)
    monitor: CollapseMonitor | None = field(default=None)  # collapse signals of each logging interval's last step
    batches: Any = field(default=None)  # the loader's running iteration (a generator), closed by `_train`

    @property
    def iters_per_epoch(self) -> int:
        return self.schedules.iters_per_epoch


def train(cfg: MugsConfig) -> TrainResult:
    """Trains (or resumes) the run described by `cfg`; raises TrainError with a one-line message."""
    check_inputs(cfg)
    rt = init_runtime(cfg)
    lock = RunLock(cfg.output_dir)
    try:
        _own_run_directory(lock, rt)
        result = _train(cfg, rt)
        settle(rt.control)
        return result
    except RuntimeError as e:  # a frozen or lost rank: one line that names it, not a traceback
        message = collective_failure(rt, e, cfg.collective_timeout_minutes)
        if message is None:
            raise
        raise TrainError(message) from None
    finally:
        lock.release()
        shutdown(rt)


def _own_run_directory(lock: RunLock, rt: Runtime) -> None:
    """Rank 0 locks the run directory for the run's life; every rank refuses to start when another run holds it
    (two commands on one directory would interleave their metrics and overwrite each other's checkpoint)."""
    holder = None
    if rt.is_main:
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        holder = lock.acquire()
    if rt.vote(holder is not None)[0]:
        holder = rt.gather_objects(holder)[0]
        raise TrainError(
            f"--output_dir {lock.path.parent} is in use by another run ({holder}): wait for it to end "
            "or use another --output_dir"
        )


def check_inputs(cfg: MugsConfig) -> None:
    """Refuses, before anything is built or written, input the run would fail on later: missing or unreadable
    .beton files, a val set whose labels kNN cannot match to the training set's."""
    if cfg.synthetic == bool(cfg.data_path):
        raise TrainError("give either --data_path FILE.beton or --synthetic true")
    if problem := output_dir_problem(cfg.output_dir):
        raise TrainError(f"--output_dir {cfg.output_dir}: {problem}")
    for name in ("data_path", "val_path"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise TrainError(f"--{name} {path}: no such file")
    if cfg.val_path and not cfg.data_path:
        raise TrainError("--val_path needs --data_path: the kNN evaluation uses the training set as its memory")
    # the files' contents too, now: a bad --val_path would otherwise surface at the first evaluation, epochs later
    readers = {name: _open_beton(name, getattr(cfg, name)) for name in ("data_path", "val_path") if getattr(cfg, name)}
    if cfg.val_path:
        try:
            check_knn_datasets(readers["data_path"], readers["val_path"])
        except DatasetMismatch as e:
            raise TrainError(f"--val_path {cfg.val_path}: {e}") from None


def _open_beton(flag: str, path: str) -> BetonReader:
    try:
        return BetonReader(path)
    except BetonError as e:  # its message starts with the path
        raise TrainError(f"--{flag} {e}") from None


def check_ring_sizes(cfg: MugsConfig, world_size: int) -> None:
    """Each step writes 2 W B rows into the InfoNCE queues and W B into the memories: refuse, before any work,
    rings too small to take them (the write would fail at the first step, after the model is built)."""
    global_batch = cfg.batch_size_per_gpu * world_size
    rings = dict(instance_queue_size=cfg.use_instance, local_group_queue_size=cfg.use_local_group)
    for name, used in rings.items():
        if used and getattr(cfg, name) < 2 * global_batch:
            raise TrainError(
                f"--{name} {getattr(cfg, name)} is smaller than the {2 * global_batch} teacher rows of one step "
                f"(2 views x global batch {global_batch}): raise it or lower --batch_size_per_gpu"
            )


def _train(cfg: MugsConfig, rt: Runtime) -> TrainResult:
    out = Path(cfg.output_dir)
    resume = _existing_checkpoint(cfg, out, rt.world_size)
    if rt.vote(resume is None)[0] and rt.vote(resume is not None)[0]:
        raise TrainError(f"only some processes see {out / CHECKPOINT_NAME}: put --output_dir where every node sees it")
    version = code_version()
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_run_info(out, cfg, version, rt.world_size)

    loader = build_loader(cfg, rt)
    check_ring_sizes(cfg, rt.world_size)
    model = build_model(cfg, rt.device)
    optimizer = build_optimizer(cfg, model.student)
    schedules = build_schedules(cfg, len(loader), rt.world_size)
    start = _restore(resume, model, optimizer, loader, rt) if resume else 0
    total = min(cfg.max_steps or len(schedules), len(schedules))
    _prepare(model, cfg, rt)
    _announce(cfg, rt, model, len(loader), start, total)

    saver = Checkpointer(out, rt, model, optimizer, loader, len(loader), version, cfg.checkpoint_minutes)
    logger = MetricLogger(
        out,
        total_steps=total,
        start_step=start,
        global_batch=cfg.batch_size_per_gpu * rt.world_size,
        log_freq=cfg.log_freq,
        device=rt.device,
        enabled=rt.is_main,
    )
    with StopSignal() as stop:
        run = Run(cfg, rt, loader, model, optimizer, schedules, saver, logger, stop, monitor=CollapseMonitor(model))
        try:
            signal_name = _loop(run, start, total) if start < total else ""
        finally:
            logger.close()
            if run.batches is not None:  # close it now, while DALI is up: a traceback would keep it alive
                run.batches.close()  # until exit, where draining the torn-down pipeline prints AttributeError
    stopped_by = signal_name or ("done" if total == len(schedules) else "max_steps")
    step = saver.last_step if saver.last_step is not None else start
    if rt.is_main:
        print(f"mugs-train: stopped ({stopped_by}) at step {step}/{total}; checkpoint {saver.path}", flush=True)
    if rt.is_main and cfg.val_path:
        plot_learning_curves(out / "metrics.jsonl", out / "learning_curves.png", title=cfg.recipe or cfg.arch)
    return TrainResult(step, total, stopped_by, saver.path if saver.path.exists() else None, run.knn)


def _loop(run: Run, start: int, end: int) -> str:
    """Optimiser steps start .. end - 1. Returns the name of the signal that stopped it early, or ""."""
    cfg, rt, ipe = run.cfg, run.rt, run.iters_per_epoch
    batches = None
    for step in range(start, end):
        epoch, position = divmod(step, ipe)
        if batches is None or position == 0:
            run.loader.set_epoch(epoch)  # keeps the position of a resumed epoch
            batches = run.batches = iter(run.loader)

        # data: host time blocked here is the data wait of the metrics
        t0 = time.perf_counter()
        batch = next(batches)
        data_seconds = time.perf_counter() - t0

        # one Mugs step; nothing in it syncs with the GPU (the last step of a logging interval is also
        # measured by the collapse monitor, on the device)
        last = step + 1 == end
        if run.logger.ends_interval(step) or last:
            run.monitor.arm(float(run.schedules.teacher_temp[step]))
        metrics = train_step(run.model, run.optimizer, run.schedules, batch, step)
        run.logger.step(metrics, data_seconds)

        # logging interval: reads the losses and the collapse signals (sync) and stops on a non-finite loss
        if run.logger.due(step) or last:
            record = run.logger.log(step, epoch, run.loader.num_replaced, snapshot=run.monitor.take())
            _warn_if_collapsed(run, record)
            _stop_if_nonfinite(run)

        # epoch end: checkpoint, numbered copy every saveckp_freq epochs, then kNN every knn_freq epochs (after
        # the checkpoint: an evaluation that fails loses no training)
        epoch_end = position + 1 == ipe
        stop_now, time_due = rt.vote(run.stop.received is not None, run.saver.time_due())  # host-side only
        if epoch_end or last or stop_now or time_due:
            _stop_if_nonfinite(run)
            run.saver.save(step + 1)  # sync: the state is copied to the host
        if epoch_end and cfg.saveckp_freq and epoch % cfg.saveckp_freq == 0:
            run.saver.keep_numbered(epoch)
        if epoch_end and cfg.val_path and _knn_due(cfg, epoch):
            _evaluate(run, epoch, step + 1)  # syncs (reads the accuracies)
        if stop_now:
            return run.stop.name
    return ""


def _warn_if_collapsed(run: Run, record: dict[str, Any] | None) -> None:
    """Prints the collapse warning (rank 0, once per run) when the record's signals cross their thresholds."""
    warning = run.monitor.warning(record) if record is not None else None
    if warning:
        run.logger.warn(warning)


def _stop_if_nonfinite(run: Run) -> None:
    """Raises TrainError (on every rank) when a loss went non-finite on any rank; nothing is saved then."""
    report = run.model.nonfinite_report()  # host sync
    if not run.rt.vote(report is not None)[0]:
        return
    report = next(r for r in run.rt.gather_objects(report) if r is not None)
    kept = f"the last good checkpoint is kept: {run.saver.path}" if run.saver.path.exists() else "no checkpoint kept"
    raise TrainError(f"{report}; stopped ({kept})")


def _knn_due(cfg: MugsConfig, epoch: int) -> bool:
    return epoch + 1 == cfg.epochs or (cfg.knn_freq > 0 and (epoch + 1) % cfg.knn_freq == 0)


def _evaluate(run: Run, epoch: int, step: int) -> None:
    cfg, rt = run.cfg, run.rt
    run.knn = evaluate_knn(
        run.model.teacher.backbone,
        cfg.data_path,
        cfg.val_path,
        crop_size=cfg.global_crop_size,
        temperature=knn_temperature(cfg.arch),
        precision=cfg.precision,
        rank=rt.rank,
        world_size=rt.world_size,
        num_threads=rt.loader_threads,
    )
    run.logger.log_eval(step, epoch, "knn", run.knn)
    if cfg.linear_eval and epoch + 1 == cfg.epochs:
        _evaluate_linear(run, epoch, step)


def _evaluate_linear(run: Run, epoch: int, step: int) -> None:
    """The fast linear probe of the teacher (`mugs_fast.linear`), after the last epoch; every rank runs it."""
    from mugs_fast.linear import LinearProbeError, linear_probe

    cfg, rt = run.cfg, run.rt
    try:
        results = linear_probe(
            run.model.teacher.backbone,
            cfg.arch,
            cfg.data_path,
            cfg.val_path,
            precision=cfg.precision,
            num_threads=rt.loader_threads,
            rank=rt.rank,
            world_size=rt.world_size,
        )
    except LinearProbeError as e:  # e.g. too few images to hold some out; the checkpoint is saved already
        raise TrainError(f"linear probe: {e}") from None
    run.logger.log_eval(step, epoch, "linear", results)


def build_loader(cfg: MugsConfig, rt: Runtime) -> MultiCropSource:
    """The multi-crop loader of this rank: DALI over cfg.data_path, or synthetic crops on the device."""
    args = dict(
        crops=CropSpec.from_config(cfg),
        device=rt.device,
        seed=cfg.seed,
        rank=rt.rank,
        world_size=rt.world_size,
        dtype=rt.dtype,
    )
    if cfg.synthetic:
        from mugs_fast.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg.batch_size_per_gpu, **args)
    from mugs_fast.data.loader import MultiCropLoader

    try:
        return MultiCropLoader(cfg.data_path, cfg.batch_size_per_gpu, num_threads=rt.loader_threads, **args)
    except ValueError as e:  # e.g. a dataset smaller than one global batch
        raise TrainError(f"--data_path {cfg.data_path}: {e}") from None


def build_model(cfg: MugsConfig, device: torch.device) -> Mugs:
    """The run's model at initialisation (seeded from cfg.seed: the same weights on every rank and every run)."""
    seed_everything(cfg.seed)
    return Mugs(cfg).to(device)


def _existing_checkpoint(cfg: MugsConfig, out: Path, world_size: int) -> dict[str, Any] | None:
    """The run directory's checkpoint, after checking that it belongs to the same run (before anything is written)."""
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        ckpt = load_checkpoint(path)
        saved = MugsConfig.from_dict(ckpt["config"])
    except (CheckpointError, ValueError) as e:
        raise TrainError(f"cannot resume: {e}") from None
    differ = [
        f"{k}: {v} (was {saved.to_dict()[k]})"
        for k, v in cfg.to_dict().items()
        if k not in RUN_CONTROL_FIELDS and v != saved.to_dict()[k]
    ]
    if differ:
        raise TrainError(f"{out} holds a run with other settings ({'; '.join(differ)}): use another --output_dir")
    if len(ckpt["rng"]) != world_size:
        written_by = len(ckpt["rng"])
        raise TrainError(f"cannot resume: the checkpoint was written by {written_by} processes, not {world_size}")
    return ckpt


def _restore(ckpt: dict[str, Any], model: Mugs, optimizer, loader, rt: Runtime) -> int:
    try:
        return restore_training_state(ckpt, model, optimizer, loader, rt.rank)
    except ValueError as e:
        raise TrainError(f"cannot resume: {e}") from None


def _prepare(model: Mugs, cfg: MugsConfig, rt: Runtime) -> None:
    """`Mugs.prepare` for this run: DDP (and SyncBatchNorm in the heads) when distributed, --compile."""
    if rt.distributed and cfg.use_bn_in_head and rt.device.type != "cuda":
        raise TrainError("--use_bn_in_head true with several processes needs SyncBatchNorm, which needs GPUs")
    model.prepare(distributed=rt.distributed, compile=cfg.compile)


def _announce(cfg: MugsConfig, rt: Runtime, model: Mugs, iters_per_epoch: int, start: int, total: int) -> None:
    if not rt.is_main:
        return
    params = sum(p.numel() for p in model.teacher.backbone.parameters()) / 1e6
    data = "synthetic crops" if cfg.synthetic else cfg.data_path
    where = f"resuming at step {start}" if start else "starting"
    print(
        f"mugs-train: {cfg.arch} ({params:.1f}M backbone parameters) on {data}; {iters_per_epoch} steps/epoch x "
        f"{cfg.epochs} epochs, global batch {cfg.batch_size_per_gpu * rt.world_size} on {rt.world_size} "
        f"process(es) ({rt.device.type}); {where}, training to step {total}; run directory {cfg.output_dir}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        result = train(cfg)
    except (TrainError, CheckpointWriteError) as e:
        print(f"mugs-train: error: {e}", file=sys.stderr)
        return 1
    if result.stopped_by.startswith("SIG"):
        return 128 + signal.Signals[result.stopped_by].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
