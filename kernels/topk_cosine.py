"""Cosine top-k search of queries over a feature memory (the Mugs local-group neighbours)."""

import torch
import torch.nn.functional as F


def topk_cosine_ref(
    queries: torch.Tensor, memory: torch.Tensor, k: int, n_valid: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the k rows of `memory[:n_valid]` most cosine-similar to each query.

    queries (Q, D), memory (N, D), any float dtype, normalised or not.
    Returns similarities (Q, k) in fp32 (fp64 for fp64 inputs), sorted descending, and indices (Q, k) int64.
    """
    n = memory.shape[0] if n_valid is None else n_valid
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q = F.normalize(queries.to(dtype), dim=1)
    m = F.normalize(memory[:n].to(dtype), dim=1)
    sims = q @ m.T  # (Q, n)
    return sims.topk(k, dim=1)


def topk_cosine(
    queries: torch.Tensor, memory: torch.Tensor, k: int, n_valid: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query over the first `n_valid` rows of `memory` (all rows by default)."""
    return topk_cosine_ref(queries, memory, k, n_valid)
