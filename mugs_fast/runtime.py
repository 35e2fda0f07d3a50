"""The process a run lives in: device, process group, seeds, numerics switches, and stop signals.

`torchrun` (or a cluster launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) makes a run
distributed: NCCL between GPUs, gloo between CPU processes. Decisions that every rank must take together
(stop now, write a checkpoint now, a loss went non-finite) go through `Runtime.vote`, a host-side
all-reduce over a gloo group: it never waits for the GPU.
"""

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mugs_fast.config import MugsConfig


@dataclass
class Runtime:
    """rank / world_size / local_rank of this process, its device, and the gloo group for host-side votes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: object = None  # gloo ProcessGroup when distributed
    loader_threads: int = 1  # CPU threads of the data loaders (DALI)
    previous_torch_threads: int = 0  # torch's intra-op threads before this run (restored by `shutdown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def vote(self, *flags: bool) -> list[bool]:
        """Each flag True on every rank when it is True on at least one (a CPU all-reduce: no GPU sync)."""
        if not self.distributed:
            return list(flags)
        votes = torch.tensor([int(f) for f in flags])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in votes.tolist()]  # a CPU tensor: no device sync

    def gather_objects(self, obj) -> list:
        """`obj` of every rank, in rank order (pickled over the gloo group)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out


def init_runtime(cfg: MugsConfig) -> Runtime:
    """Joins the process group when launched with WORLD_SIZE > 1, picks the device, seeds, sets numerics.

    GPU runs get TF32 matmuls and convolutions (the release's A100 numerics) and cuDNN autotuning. CPU runs
    share this process's cores between the loader's threads (at most cfg.num_workers) and torch's intra-op
    threads: more threads than cores makes every small op wait on descheduled OpenMP threads.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    control = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30), device_id=device if backend == "nccl" else None)
        control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    seed_everything(cfg.seed)
    rt = Runtime(rank, world_size, local_rank, device, control, previous_torch_threads=torch.get_num_threads())
    rt.loader_threads = cfg.num_workers
    if device.type == "cpu":
        rt.loader_threads, torch_threads = cpu_threads(0 if cfg.synthetic else cfg.num_workers)
        torch.set_num_threads(torch_threads)
    return rt


def cpu_threads(loader_threads: int) -> tuple[int, int]:
    """(loader threads, torch threads) for a CPU process: the loader gets at most `loader_threads` and leaves
    torch at least one of the cores this process may use (its share when several processes run on a node)."""
    cores = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loader = min(loader_threads, max(1, cores - 1))
    return loader, max(1, cores - loader)


@contextlib.contextmanager
def cpu_thread_budget(loader_threads: int) -> Iterator[int]:
    """For CPU work outside a run (evaluation): yields the loader's thread count per `cpu_threads`, with
    torch's intra-op threads set to the rest of the cores until the block ends. A no-op with CUDA."""
    if torch.cuda.is_available():
        yield loader_threads
        return
    loader, torch_threads = cpu_threads(loader_threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        yield loader
    finally:
        torch.set_num_threads(previous)


def shutdown(rt: Runtime) -> None:
    torch.set_num_threads(rt.previous_torch_threads)
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """The same seed on every rank, as the release (torch CPU and CUDA, numpy, python)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignal:
    """SIGTERM / SIGINT set a flag that the training loop reads between steps (then checkpoints and exits).

    A second SIGINT raises KeyboardInterrupt at once, for a user who does not want to wait. The previous
    handlers come back with `restore()` (also on leaving a `with` block).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
