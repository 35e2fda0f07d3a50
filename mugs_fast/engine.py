"""The training loop: `train(cfg)` runs, or resumes, a Mugs pretraining run in `cfg.output_dir`.

One process per GPU (torchrun), or one or more CPU processes. Every step is `mugs.train_step` on a batch of
the DALI multi-crop loader (`--data_path`) or of GPU-resident random crops (`--synthetic`). The host syncs
with the GPU only at the logging interval, at checkpoints and at evaluations; host-side votes between ranks
(stop, checkpoint time) go over gloo and never wait for the GPU.

Re-running the same command resumes from `output_dir/checkpoint.pth` where it stopped, mid-epoch included,
and continues exactly as if it had not stopped (same batches, augmentations and random numbers).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from mugs_fast.checkpoint import (
    CHECKPOINT_NAME,
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    restore_training_state,
)
from mugs_fast.config import MugsConfig
from mugs_fast.knn import evaluate_knn, knn_temperature
from mugs_fast.metrics import MetricLogger, code_version, write_run_info
from mugs_fast.mugs import Mugs, train_step
from mugs_fast.optim import Schedules, build_optimizer, build_schedules
from mugs_fast.runtime import Runtime, StopSignal, init_runtime, seed_everything, shutdown

# Fields that may change between a run and its resumption: how it is driven, not what it computes.
RUN_CONTROL_FIELDS = frozenset(
    {"max_steps", "output_dir", "data_path", "val_path", "log_freq", "checkpoint_minutes", "knn_freq", "compile"}
    | {"num_workers", "dist_url", "local_rank", "rank", "world_size", "recipe"}
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
    loader: Any
    model: Mugs
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    saver: Checkpointer
    logger: MetricLogger
    stop: StopSignal
    knn: dict[str, Any] | None = field(default=None)

    @property
    def iters_per_epoch(self) -> int:
        return self.schedules.iters_per_epoch


def train(cfg: MugsConfig) -> TrainResult:
    """Trains (or resumes) the run described by `cfg`; raises TrainError with a one-line message."""
    check_inputs(cfg)
    rt = init_runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        shutdown(rt)


def check_inputs(cfg: MugsConfig) -> None:
    if cfg.synthetic == bool(cfg.data_path):
        raise TrainError("give either --data_path FILE.beton or --synthetic true")
    for name in ("data_path", "val_path"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise TrainError(f"--{name} {path}: no such file")
    if cfg.val_path and not cfg.data_path:
        raise TrainError("--val_path needs --data_path: the kNN evaluation uses the training set as its memory")
    if cfg.data_path:
        _check_augmentation(cfg)


def _check_augmentation(cfg: MugsConfig) -> None:
    """The DALI loader implements the release's augmentation with its default settings: refuse other values
    rather than ignore them."""
    from mugs_fast.data.params import ERASE_P, GLOBAL_SCALE, LOCAL_SCALE, STRONG_P

    fixed = dict(
        global_crops_scale=GLOBAL_SCALE,
        local_crops_scale=LOCAL_SCALE,
        prob=1 - STRONG_P,
        re_prob=ERASE_P,
        color_aug=False,
        vanilla_weak_augmentation=False,
        timm_auto_augment_par="rand-m9-mstd0.5-inc1",
    )
    for name, value in fixed.items():
        if getattr(cfg, name) != value:
            raise TrainError(f"--{name} {getattr(cfg, name)}: the DALI loader supports only {value} (the release's)")


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
    resume = _existing_checkpoint(cfg, out)
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
    _wrap_for_speed(model, cfg, rt)
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
        run = Run(cfg, rt, loader, model, optimizer, schedules, saver, logger, stop)
        try:
            signal_name = _loop(run, start, total) if start < total else ""
        finally:
            logger.close()
    stopped_by = signal_name or ("done" if total == len(schedules) else "max_steps")
    step = saver.last_step if saver.last_step is not None else start
    if rt.is_main:
        print(f"mugs-train: stopped ({stopped_by}) at step {step}/{total}; checkpoint {saver.path}", flush=True)
    return TrainResult(step, total, stopped_by, saver.path if saver.path.exists() else None, run.knn)


def _loop(run: Run, start: int, end: int) -> str:
    """Optimiser steps start .. end - 1. Returns the name of the signal that stopped it early, or ""."""
    cfg, rt, ipe = run.cfg, run.rt, run.iters_per_epoch
    batches = None
    for step in range(start, end):
        epoch, position = divmod(step, ipe)
        if batches is None or position == 0:
            run.loader.set_epoch(epoch)  # keeps the position of a resumed epoch
            batches = iter(run.loader)

        # data: host time blocked here is the data wait of the metrics
        t0 = time.perf_counter()
        batch = next(batches)
        data_seconds = time.perf_counter() - t0

        # one Mugs step; nothing in it syncs with the GPU
        metrics = train_step(run.model, run.optimizer, run.schedules, batch, step)
        run.logger.step(metrics, data_seconds)

        # logging interval: reads the losses (sync) and stops on a non-finite one
        last = step + 1 == end
        if run.logger.due(step) or last:
            run.logger.log(step, epoch, getattr(run.loader, "num_replaced", 0))  # the synthetic loader has none
            _stop_if_nonfinite(run)

        # epoch end: kNN every knn_freq epochs, checkpoint, numbered copy every saveckp_freq epochs
        epoch_end = position + 1 == ipe
        if epoch_end and cfg.val_path and _knn_due(cfg, epoch):
            _evaluate(run, epoch, step + 1)  # syncs (reads the accuracies)
        stop_now, time_due = rt.vote(run.stop.received is not None, run.saver.time_due())  # host-side only
        if epoch_end or last or stop_now or time_due:
            _stop_if_nonfinite(run)
            run.saver.save(step + 1)  # sync: the state is copied to the host
        if epoch_end and cfg.saveckp_freq and epoch % cfg.saveckp_freq == 0:
            run.saver.keep_numbered(epoch)
        if stop_now:
            return run.stop.name
    return ""


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


def build_loader(cfg: MugsConfig, rt: Runtime):
    """The multi-crop loader of this rank: DALI over cfg.data_path, or synthetic crops on the device."""
    dtype = torch.bfloat16 if (cfg.precision == "bf16" and rt.device.type == "cuda") else torch.float32
    args = dict(
        local_crops_number=cfg.local_crops_number,
        global_size=cfg.global_crop_size,
        local_size=cfg.size_crops[0],
        device=rt.device,
        seed=cfg.seed,
        rank=rt.rank,
        world_size=rt.world_size,
        dtype=dtype,
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


def _existing_checkpoint(cfg: MugsConfig, out: Path) -> dict[str, Any] | None:
    """The run directory's checkpoint, after checking that it belongs to the same run."""
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
    return ckpt


def _restore(ckpt: dict[str, Any], model: Mugs, optimizer, loader, rt: Runtime) -> int:
    if len(ckpt["rng"]) != rt.world_size:
        written_by = len(ckpt["rng"])
        raise TrainError(f"cannot resume: the checkpoint was written by {written_by} processes, not {rt.world_size}")
    try:
        return restore_training_state(ckpt, model, optimizer, loader, rt.rank)
    except ValueError as e:
        raise TrainError(f"cannot resume: {e}") from None


def _wrap_for_speed(model: Mugs, cfg: MugsConfig, rt: Runtime) -> None:
    """Optionally compiles the transformer blocks, then wraps the student in DDP when distributed.

    BatchNorm in the heads (`--use_bn_in_head`) becomes SyncBatchNorm in both networks under DDP, as in the
    release (the parameters stay the same objects, so the optimizer and the EMA pairs are unaffected).
    """
    if rt.distributed and cfg.use_bn_in_head:
        if rt.device.type != "cuda":
            raise TrainError("--use_bn_in_head true with several processes needs SyncBatchNorm, which needs GPUs")
        model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
        model.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.teacher)
    if cfg.compile:
        for network in (model.student, model.teacher):
            network.backbone.blocks.compile()  # in place: parameter names (and checkpoints) stay the same
    if rt.distributed:
        on_gpu = rt.device.type == "cuda"
        model.student = DistributedDataParallel(
            model.student, device_ids=[rt.device.index] if on_gpu else None, gradient_as_bucket_view=True
        )


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
