"""Training checkpoints: what they hold, atomic writes, RNG states, and reading them back.

A checkpoint is one `torch.save` dict that loads with `weights_only=True`:

    student, teacher, student_mem, teacher_mem,        the release's entries and key layout (spec 9.1), from
    instance-sup., local-group-sup., group-sup.        `release_entries(model)`
    optimizer                                          optimizer.state_dict()
    step                                               optimiser steps done = the index of the next step
    epoch                                              step // iterations per epoch (the release: epoch + 1
                                                       after an epoch), the epoch the next step belongs to
    loader                                             the data loader's state: its epoch and position in it
    rng                                                per rank: torch, cuda, numpy and python RNG states
    config                                             MugsConfig.to_dict() of the run
    version                                            the code version (git commit, dirty flag)

Files are written to a temporary name beside the target, flushed to disk and renamed over it, so a crash or a
kill mid-write leaves the previous checkpoint intact.
"""

import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from mugs_fast import files
from mugs_fast.config import MugsConfig
from mugs_fast.memory import FeatureMemory, FeatureQueue
from mugs_fast.mugs import Mugs
from mugs_fast.runtime import Runtime
from mugs_fast.vit import MugsViT, build_backbone

CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(ValueError):
    """A file that is not a readable mugs-fast training checkpoint (one-line message)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, quota, I/O error): one line naming the file."""


def numbered_name(epoch: int) -> str:
    """The release's numbered copy: checkpoint0050.pth for epoch 50."""
    return f"checkpoint{epoch:04}.pth"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` through a temporary file in the same directory, fsync'ed, then renamed."""
    path = Path(path)
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        _torch_save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    files.fsync_dir(path.parent)
    return path


class _WriteErrorKeeper:
    """A file for torch.save that keeps the OSError of a failed write (e.g. the disk is full)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, file: BinaryIO) -> None:
    """torch.save; a failed write raises its OSError, not the RuntimeError ("unexpected pos") that torch's zip
    writer makes of it."""
    keeper = _WriteErrorKeeper(file)
    try:
        torch.save(obj, keeper)
    except RuntimeError:
        if keeper.error is None:
            raise
        raise keeper.error from None


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to `dst` through a temporary file and a rename."""
    dst = Path(dst)
    with files.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Deletes the checkpoint temporaries of a process killed mid-write (e.g. SIGKILL after a preemption grace
    period); returns them."""
    return files.remove_stale_temporaries(directory, "checkpoint*.pth")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, every CUDA device, numpy's global, python's)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state()`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {"key": key, "pos": np_state["state"]["pos"]}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def release_entries(model: Mugs) -> dict[str, dict[str, torch.Tensor]]:
    """The model's entries of a checkpoint in the release's layout (spec 9.1): `student` (keys prefixed
    `module.`, as the release's DDP student), `teacher`, `student_mem`, `teacher_mem`, `instance-sup.`,
    `local-group-sup.` and `group-sup.` (entries of switched-off supervisions are left out)."""
    state = {
        "student": {f"module.{k}": v for k, v in model.student.state_dict().items()},
        "teacher": model.teacher.state_dict(),
    }
    if model.student_memory is not None:
        state["student_mem"] = memory_entry(model.student_memory)
        state["teacher_mem"] = memory_entry(model.teacher_memory)
    if model.instance_queue is not None:
        state["instance-sup."] = queue_entry(model.instance_queue)
    if model.local_group_queue is not None:
        state["local-group-sup."] = queue_entry(model.local_group_queue)
    if model.group_loss is not None:
        state["group-sup."] = model.group_loss.state_dict()
    return state


def load_release_entries(model: Mugs, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Loads `release_entries()` (ours or the release's) strictly; `module.` prefixes are optional."""
    student = {k.removeprefix("module."): v for k, v in state["student"].items()}
    model.student.load_state_dict(student)
    model.teacher.load_state_dict(state["teacher"])
    with torch.no_grad():
        if model.student_memory is not None:
            load_memory_entry(model.student_memory, state["student_mem"])
            load_memory_entry(model.teacher_memory, state["teacher_mem"])
        if model.instance_queue is not None:
            load_queue_entry(model.instance_queue, state["instance-sup."])
        if model.local_group_queue is not None:
            load_queue_entry(model.local_group_queue, state["local-group-sup."])
    if model.group_loss is not None:
        model.group_loss.load_state_dict(state["group-sup."])


def queue_entry(queue: FeatureQueue) -> dict[str, torch.Tensor]:
    """The release's `InfoNCELoss` state dict: `queue` (dim, size) - columns, where we keep rows - and `queue_ptr`."""
    return {"queue": queue.queue.T, "queue_ptr": queue.ptr}


def load_queue_entry(queue: FeatureQueue, entry: dict[str, torch.Tensor]) -> None:
    queue.queue.copy_(entry["queue"].T)
    queue.ptr.copy_(entry["queue_ptr"])


def memory_entry(memory: FeatureMemory) -> dict[str, torch.Tensor]:
    """The release's `vit_mem` state dict: its three copies of the rows (one storage in a saved file) and pointer."""
    f = memory.features
    return {"block.queue_q": f, "block.queue_k": f, "block.queue_v": f, "block.queue_ptr": memory.ptr}


def load_memory_entry(memory: FeatureMemory, entry: dict[str, torch.Tensor]) -> None:
    memory.features.copy_(entry["block.queue_k"])  # the rows the release returns as neighbours
    memory.ptr.copy_(entry["block.queue_ptr"])
    memory.refresh_shadow()


def training_state(
    model: Mugs,
    optimizer: torch.optim.Optimizer,
    loader_state: dict,
    step: int,
    iters_per_epoch: int,
    rng_states: list[dict[str, Any]],
    version: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict of a run after `step` optimiser steps (see the module docstring)."""
    return {
        **release_entries(model),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": step // iters_per_epoch,
        "loader": loader_state,
        "rng": rng_states,
        "config": model.cfg.to_dict(),
        "version": version,
    }


def restore_training_state(
    ckpt: dict[str, Any], model: Mugs, optimizer: torch.optim.Optimizer, loader, rank: int
) -> int:
    """Loads a checkpoint into the model, optimizer and loader, and this rank's RNG states; returns the step."""
    load_release_entries(model, ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"][rank])
    return int(ckpt["step"])


class Checkpointer:
    """Writes `checkpoint.pth` of a run (rank 0, atomically, with every rank's RNG state) and numbered copies.

    Every rank must call `save` together (the RNG states are gathered). `time_due()` is rank 0's clock:
    the caller makes every rank agree on it before saving.
    """

    def __init__(
        self,
        output_dir: Path,
        rt: Runtime,
        model: Mugs,
        optimizer: torch.optim.Optimizer,
        loader,
        iters_per_epoch: int,
        version: dict[str, Any],
        minutes: float,
    ) -> None:
        self.output_dir, self.path = output_dir, output_dir / CHECKPOINT_NAME
        self.rt, self.model, self.optimizer, self.loader = rt, model, optimizer, loader
        self.iters_per_epoch, self.version = iters_per_epoch, version
        self.interval = minutes * 60
        self.last_step: int | None = None
        self._last_time = time.monotonic()

    def time_due(self) -> bool:
        return self.rt.is_main and self.interval > 0 and time.monotonic() - self._last_time >= self.interval

    def save(self, step: int) -> None:
        """Writes the state after `step` optimiser steps."""
        rng_states = self.rt.gather_objects(rng_state())
        if self.rt.is_main:
            loader_state = self.loader.state_dict()
            state = training_state(
                self.model, self.optimizer, loader_state, step, self.iters_per_epoch, rng_states, self.version
            )
            _write_or_explain(atomic_save, state, self.path)
        self.last_step, self._last_time = step, time.monotonic()

    def keep_numbered(self, epoch: int) -> None:
        """Copies the checkpoint written at the end of `epoch` to checkpoint{epoch:04}.pth."""
        if self.rt.is_main:
            _write_or_explain(atomic_copy, self.path, self.output_dir / numbered_name(epoch))


def _write_or_explain(write: Callable[[Any, Path], Path], source: Any, path: Path) -> None:
    """`write(source, path)`; an OSError becomes a CheckpointWriteError. The write is atomic: the file that was
    at `path` before is still there, whole."""
    try:
        write(source, path)
    except OSError as e:
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}; {kept}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint on the CPU; raises CheckpointError when it is missing or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a readable checkpoint"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or "teacher" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a mugs-fast training checkpoint (no 'teacher' and 'config' entries)")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any]) -> MugsConfig:
    """The run's config; CheckpointError when this version of the code does not know it."""
    try:
        return MugsConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's config does not load: {e}") from None


def backbone_from_checkpoint(ckpt: dict[str, Any], *, key: str = "teacher", relation_blocks: bool = False) -> MugsViT:
    """The backbone of a checkpoint's `key` network (CPU, eval mode); without the relation block unless asked."""
    cfg = checkpoint_config(ckpt)
    backbone = build_backbone(
        cfg.arch,
        patch_size=cfg.patch_size,
        img_size=cfg.global_crop_size,
        depth=cfg.depth,
        num_relation_blocks=int(relation_blocks and cfg.use_local_group),
    )
    state = backbone_state(ckpt[key], relation_blocks=relation_blocks)
    backbone.load_state_dict(state)
    return backbone.eval()


def backbone_state(network_state: dict[str, torch.Tensor], *, relation_blocks: bool) -> dict[str, torch.Tensor]:
    """`backbone.*` entries of a student/teacher state dict with the prefix removed (spec 9.5)."""
    keep = [k for k in network_state if k.removeprefix("module.").startswith("backbone.")]
    state = {k.removeprefix("module.").removeprefix("backbone."): network_state[k] for k in keep}
    if not relation_blocks:
        state = {k: v for k, v in state.items() if not k.startswith("relation_blocks.")}
    return state
