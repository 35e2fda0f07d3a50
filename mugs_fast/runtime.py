"""The process a run lives in: device, process group, seeds, numerics switches, and stop signals.

`torchrun` (or a cluster launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) makes a run
distributed: NCCL between GPUs, gloo between CPU processes. Decisions that every rank must take together
(stop now, write a checkpoint now, a loss went non-finite) go through `Runtime.vote`, a host-side
all-reduce over a gloo group: it never waits for the GPU.

A run directory belongs to one run at a time (`RunLock`), workers whose torchrun agent died stop
(`stop_with_launcher`), and a collective that waits longer than `--collective_timeout_minutes` for a frozen
rank fails with a message naming that rank (`collective_failure`).
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist

from mugs_fast.config import MugsConfig


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The project's one precision policy: "bf16" (the default) computes in bf16 on CUDA only; CPU runs and
    "fp32" compute in fp32. Buffers, losses and optimiser state are fp32 either way."""
    return torch.bfloat16 if precision == "bf16" and torch.device(device).type == "cuda" else torch.float32


def autocast(dtype: torch.dtype, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when the policy's `dtype` is bf16; no autocast for fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@dataclass
class Runtime:
    """rank / world_size / local_rank of this process, its device and compute dtype (`compute_dtype`), and the
    gloo group for host-side votes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: object = None  # gloo ProcessGroup when distributed
    dtype: torch.dtype = torch.float32  # what the step and the loaders compute in
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
    stop_with_launcher()
    control = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # every group gets the timeout: new_group's default is torch's 30 minutes, not the default group's
        timeout = timedelta(minutes=cfg.collective_timeout_minutes)
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    seed_everything(cfg.seed)
    rt = Runtime(rank, world_size, local_rank, device, control, compute_dtype(cfg.precision, device))
    rt.previous_torch_threads = torch.get_num_threads()
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


LOCK_NAME = "run.lock"


class RunLock:
    """Ownership of a run directory: an exclusive flock on `run.lock`, held by rank 0 for the run's life.

    The kernel drops the lock when its holder dies, however it dies (kill -9; on NFS, a crashed node's locks go
    when its lease expires): a dead run never blocks the next one, while a live one (a second command on the
    same directory, a worker orphaned by a killed launcher) does. The file keeps its holder's "pid N on HOST"
    for the refusal message.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns None, or the holder ("pid N on HOST") when another process holds it."""
        f = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held; closed by release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"  # empty while the holder is writing its line
            f.close()
            return holder
        except OSError as e:  # a filesystem without locks (ENOLCK on some NFS mounts): run, unprotected
            f.close()
            warnings.warn(
                f"{self.path}: cannot lock ({errno.errorcode.get(e.errno, e)}): nothing stops a second run "
                "from using this directory at the same time",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor of the open file drops the flock
            self._file = None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """Under torchrun, has the kernel send this worker SIGTERM when its launcher (the elastic agent) dies.

    Workers outlive an agent killed with -9 (a job requeued by the cluster, a user's kill): without this they
    train on beside the requeued job. SIGTERM makes them stop as on preemption (finish the step, checkpoint,
    exit 143). Linux only; elsewhere, and outside torchrun (where the parent is a shell or a cluster daemon), a
    no-op.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_FAILED_KEY = "mugs-fast/collective-failed/{}"


def collective_failure(rt: Runtime, error: BaseException, timeout_minutes: float) -> str | None:
    """One line for a collective that timed out or lost a peer (None for any other error).

    After a timeout the process group's connections are closed, so the ranks find the silent ones through the
    rendezvous store (a server outside the collectives): every rank that failed marks itself there, and a rank
    that timed out waits a little (the others time out at about the same moment) and names the unmarked ones.
    """
    text = str(error).strip()
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    lost = "connection closed by peer" in text.lower() or "connection reset by peer" in text.lower()
    if not rt.distributed or not (timed_out or lost):
        return None
    detail = text.splitlines()[0][:300] if text else type(error).__name__
    if not timed_out:
        _mark_failed(rt, wait_s=0)
        return f"rank {rt.rank}: lost the connection to another rank (it stopped or died: see its log) ({detail})"
    silent = _mark_failed(rt, wait_s=min(60.0, 15 * timeout_minutes))  # a quarter of the timeout, at most 1 min
    if silent is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        silent = [0]  # without torchrun's agent, rank 0 hosts the store: a store that does not answer is rank 0's
    if silent is None:
        who = "the silent rank is unknown (the rendezvous store does not answer)"
    elif silent:
        who = f"no answer from rank {', '.join(map(str, silent))} (frozen or stuck: see its log)"
    else:
        who = "every rank answered in the end (one was slower than the timeout: raise it)"
    what = f"a collective timed out after {timeout_minutes:g} min (--collective_timeout_minutes)"
    return f"rank {rt.rank}: {what}; {who} ({detail})"


def _mark_failed(rt: Runtime, wait_s: float) -> list[int] | None:
    """Marks this rank in the store, then waits up to wait_s for every rank to do so; returns the ranks that did
    not, or None when the store does not answer in time (its host may be the frozen process: a store call to a
    stopped host can block for good, hence the thread)."""
    result: list[list[int] | None] = []
    poll = threading.Thread(target=lambda: result.append(_poll_store(rt, wait_s)), daemon=True)
    poll.start()
    poll.join(wait_s + 5)
    return result[0] if result else None


def _poll_store(rt: Runtime, wait_s: float) -> list[int] | None:
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_FAILED_KEY.format(rt.rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(rt.world_size) if not store.check([_FAILED_KEY.format(r)])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any store error means "unknown"; the caller reports the collective's error
        return None
