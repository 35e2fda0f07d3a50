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
