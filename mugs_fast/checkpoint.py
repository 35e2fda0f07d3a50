"""Training checkpoints: what they hold, atomic writes, RNG states, and reading them back.

A checkpoint is one `torch.save` dict that loads with `weights_only=True`:

    student, teacher, student_mem, teacher_mem,        the release's entries and key layout (spec 9.1), from
    instance-sup., local-group-sup., group-sup.        `Mugs.checkpoint_state()`
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mugs_fast.config import MugsConfig
from mugs_fast.mugs import Mugs
from mugs_fast.runtime import Runtime
from mugs_fast.vit import MugsViT, build_backbone

CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(ValueError):
    """A file that is not a readable mugs-fast training checkpoint (one-line message)."""


def numbered_name(epoch: int) -> str:
    """The release's numbered copy: checkpoint0050.pth for epoch 50."""
    return f"checkpoint{epoch:04}.pth"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` through a temporary file in the same directory, fsync'ed, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to `dst` through a temporary file and a rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Deletes temporaries left by a process killed mid-write (e.g. SIGKILL after a preemption grace period)."""
    for tmp in Path(directory).glob(".checkpoint*.pth.tmp-*"):
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        **model.checkpoint_state(),
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
    model.load_checkpoint_state(ckpt)
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
            atomic_save(state, self.path)
        self.last_step, self._last_time = step, time.monotonic()

    def keep_numbered(self, epoch: int) -> None:
        """Copies the checkpoint written at the end of `epoch` to checkpoint{epoch:04}.pth."""
        if self.rt.is_main:
            atomic_copy(self.path, self.output_dir / numbered_name(epoch))


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
