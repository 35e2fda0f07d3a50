"""torch.distributed helpers that degrade to no-ops in a single process.

Every collective here is asynchronous with respect to the host on NCCL: none forces a CPU-GPU sync.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate `x` from every rank along `dim`, rank 0 first (no gradient).

    Every rank must pass the same shape (the Mugs loaders give every rank the same batch size); ranks with a
    variable number of useful rows send a fixed-size tensor plus a mask instead (see `FeatureMemory.write`).
    """
    if not is_distributed():
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a new tensor; `x` is left as it is)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size()


def settle(group=None) -> None:
    """At a clean end of a distributed run, after its last collective: waits, without the GIL, until every rank of
    `group` gets here. Gloo's worker threads drop each collective's tensors after the caller has its result, and need
    the GIL to do it: a rank that exits right after its last collective can reach the interpreter's finalisation
    first and abort (SIGABRT, "terminate called without an active exception"; seen with torch 2.11 on one
    two-process CPU training run in 12-26). While this thread waits here, they finish.

    Only where every rank has already passed the last collective: a rank that failed before it has left the others
    waiting in that collective already, so this barrier adds no new way to hang. A no-op on NCCL groups."""
    if is_distributed() and dist.get_backend(group) == "gloo":
        dist.barrier(group=group)
