"""Cosine top-k search of queries over a feature memory (the Mugs local-group neighbours).

The Triton path splits the memory rows across CTAs (grid = query blocks x splits, query block fastest, so the CTAs
that read one memory chunk run together and share it in L2). Each CTA streams its chunk tile by tile: a tensor-core
dot gives the (BLOCK_M x BLOCK_N) dot products, the memory rows' norms are summed from the same loaded tiles, and a
running top-k per query row lives in registers - a tile's maximum is inserted over the row's current k-th value and
masked out, for as long as some row's maximum beats its k-th value (no sort). Each CTA writes k candidates per row;
`torch.topk` over the (Q, splits * k) candidates merges them. The (Q x N) similarity matrix never exists.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import TL_DTYPES, dot_dtype, dot_precision, launch_options, num_sms, use_triton

MAX_K = 16  # the running top-k lives in registers: (BLOCK_M, next_pow2(k)) values and indices
NORM_EPS = 1e-12  # as F.normalize: x / max(|x|, eps)


@triton.jit
def _topk_cosine_kernel(
    Queries,  # (R, D), in DOT_DTYPE
    Memory,  # (N, D): only the first N rows are searched (n_valid)
    PartV,  # (R, S, K) fp32: each split's top-k similarities, unordered
    PartI,  # (R, S, K) int32: their memory rows
    R,
    N,
    D,
    tiles_per_split,
    stride_q,
    stride_m,
    stride_pr,
    stride_ps,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EPS: tl.constexpr,
):
    pid_m = tl.program_id(0)  # query block: fastest, so the CTAs sharing a memory chunk are co-resident
    pid_s = tl.program_id(1)  # memory split
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, K_PAD)

    q_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        q = tl.load(Queries + rows[:, None] * stride_q + (d0 + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :])
        q = q.to(tl.float32)
        q_sq += tl.sum(q * q, axis=1)
    q_inv = 1.0 / tl.maximum(tl.sqrt(q_sq), EPS)

    # Slots >= K hold +inf, so they are never the row minimum (never replaced) and never stored.
    top_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, K_PAD), tl.float32)
    top_i = tl.full((BLOCK_M, K_PAD), -1, dtype=tl.int32)
    kth = tl.min(top_v, axis=1)  # the row's k-th best so far

    n_start = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(n_start + tiles_per_split * BLOCK_N, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        m_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            q = tl.load(
                Queries + rows[:, None] * stride_q + (d0 + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :]
            )
            m = tl.load(
                Memory + cols[:, None] * stride_m + (d0 + offs_d)[None, :], mask=col_ok[:, None] & d_ok[None, :]
            )
            dots = tl.dot(q, tl.trans(m.to(DOT_DTYPE)), dots, input_precision=DOT_PRECISION)
            m32 = m.to(tl.float32)
            m_sq += tl.sum(m32 * m32, axis=1)
        m_inv = 1.0 / tl.maximum(tl.sqrt(m_sq), EPS)
        sims = dots * q_inv[:, None] * m_inv[None, :]
        sims = tl.where(col_ok[None, :], sims, float("-inf"))

        # Insert each row's tile maximum over its k-th value, mask it out, repeat while any row still improves.
        # Strict `>`: among equal values the earlier memory row stays, and a -inf (masked) entry never enters.
        t_max, t_arg = tl.max(sims, axis=1, return_indices=True)
        while tl.max((t_max > kth).to(tl.int32), axis=0) > 0:
            better = t_max > kth
            worst = tl.argmin(top_v, axis=1)
            put = better[:, None] & (slots[None, :] == worst[:, None])
            top_v = tl.where(put, t_max[:, None], top_v)
            top_i = tl.where(put, (n0 + t_arg)[:, None], top_i)
            sims = tl.where(better[:, None] & (offs_n[None, :] == t_arg[:, None]), float("-inf"), sims)
            kth = tl.min(top_v, axis=1)
            t_max, t_arg = tl.max(sims, axis=1, return_indices=True)

    out = rows[:, None] * stride_pr + pid_s * stride_ps + slots[None, :]
    keep = row_ok[:, None] & (slots[None, :] < K)
    tl.store(PartV + out, top_v, mask=keep)
    tl.store(PartI + out, top_i, mask=keep)


def topk_config(dot: torch.dtype, memory_dtype: torch.dtype, on_gpu: bool) -> dict:
    """Tile sizes of the search (fixed, not autotuned: the compile-only test checks exactly these).

    The queries are re-read for every memory tile, so a CTA does BLOCK_M * BLOCK_N / (BLOCK_M + BLOCK_N) FLOPs per
    byte it reads from L2: 128 x 128 tiles (64 FLOP/B) for a 16-bit memory with 16-bit dots, the most that fits in
    registers at 8 warps next to the running top-k (fed 32 features at a time; 64 spills). An fp32 memory converted in
    the kernel, or TF32 dots, need twice the registers: 128 x 64 tiles. Under the interpreter small tiles, so that
    small test shapes still span several blocks, tiles and splits.
    """
    if not on_gpu:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1}
    if dot != torch.float32 and memory_dtype != torch.float32:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}
    block_d = 32 if dot == torch.float32 else 64
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 3}


MIN_TILES_PER_SPLIT = 8  # the first tile costs up to k insertion rounds: keep each split long enough to amortise it


def _num_splits(row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Splits of the memory for about 2 CTAs per SM (two waves: the CTAs are register-bound to one per SM), each
    over at least MIN_TILES_PER_SPLIT tiles."""
    wanted = triton.cdiv(2 * num_sms(device), row_blocks)
    return max(1, min(wanted, n_tiles // MIN_TILES_PER_SPLIT))


def _topk_cosine_triton(
    queries: torch.Tensor, memory: torch.Tensor, k: int, n_valid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host launcher: allocation and grid for the kernel, then the merge of the splits' candidates."""
    dot = dot_dtype(queries, memory)
    queries = queries.to(dot).contiguous()  # (Q, D): small; the memory is read as it is
    memory = memory if memory.stride(-1) == 1 else memory.contiguous()
    rows, dim = queries.shape
    cfg = topk_config(dot, memory.dtype, on_gpu=queries.is_cuda)
    row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(n_valid, cfg["BLOCK_N"])
    tiles_per_split = triton.cdiv(n_tiles, _num_splits(row_blocks, n_tiles, queries.device))
    splits = triton.cdiv(n_tiles, tiles_per_split)

    part_v = torch.empty(rows, splits, k, device=queries.device, dtype=torch.float32)
    part_i = torch.empty(rows, splits, k, device=queries.device, dtype=torch.int32)
    _topk_cosine_kernel[(row_blocks, splits)](
        queries,
        memory,
        part_v,
        part_i,
        rows,
        n_valid,
        dim,
        tiles_per_split,
        queries.stride(0),
        memory.stride(0),
        part_v.stride(0),
        part_v.stride(1),
        K=k,
        K_PAD=triton.next_power_of_2(k),
        DOT_DTYPE=TL_DTYPES[dot],
        DOT_PRECISION=dot_precision(),
        EPS=NORM_EPS,
        **cfg,
        **launch_options(),
    )
    sims, pos = part_v.view(rows, splits * k).topk(k, dim=1)  # (Q, k), sorted descending
    return sims, part_i.view(rows, splits * k).gather(1, pos).long()


TORCH_CHUNK_ELEMS = 1 << 24  # the PyTorch path's similarities at a time: 64 MiB in fp32


def topk_cosine_ref(
    queries: torch.Tensor, memory: torch.Tensor, k: int, n_valid: int | None = None, chunk_elems: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference, and the PyTorch path of `topk_cosine`: the k rows of `memory[:n_valid]` most cosine-similar to
    each query.

    queries (Q, D), memory (N, D), any float dtype, normalised or not. chunk_elems: search blocks of queries so that
    at most this many similarities exist at a time (default: all queries at once).
    Returns similarities (Q, k) in fp32 (fp64 for fp64 inputs), sorted descending, and indices (Q, k) int64.
    """
    n = memory.shape[0] if n_valid is None else n_valid
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q = F.normalize(queries.to(dtype), dim=1)
    m = F.normalize(memory[:n].to(dtype), dim=1)
    chunk = max(1, queries.shape[0] if chunk_elems is None else chunk_elems // n)
    parts = [(q_blk @ m.T).topk(k, dim=1) for q_blk in q.split(chunk)]  # each (chunk, n) -> (chunk, k)
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _check_inputs(queries: torch.Tensor, memory: torch.Tensor, k: int, n_valid: int) -> None:
    if queries.dim() != 2 or memory.dim() != 2 or queries.shape[1] != memory.shape[1]:
        raise ValueError(
            f"topk_cosine: expected queries (Q, D) and memory (N, D), got {tuple(queries.shape)} and "
            f"{tuple(memory.shape)}"
        )
    if not (queries.is_floating_point() and memory.is_floating_point()):
        raise TypeError(f"topk_cosine: expected float tensors, got {queries.dtype} and {memory.dtype}")
    if queries.device != memory.device:
        raise ValueError(f"topk_cosine: queries on {queries.device} but memory on {memory.device}")
    if not 0 < n_valid <= memory.shape[0]:
        raise ValueError(f"topk_cosine: n_valid={n_valid} outside 1..{memory.shape[0]} (the memory's rows)")
    if not 1 <= k <= n_valid:
        raise ValueError(f"topk_cosine: k={k} outside 1..{n_valid} (the valid memory rows)")


def _unsupported(queries: torch.Tensor, memory: torch.Tensor, k: int) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None."""
    if k > MAX_K:
        return f"k={k} > {MAX_K}"
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if queries.dtype not in kernel_dtypes or memory.dtype not in kernel_dtypes:
        return f"dtypes {queries.dtype} / {memory.dtype} (fp32, bf16, fp16 only)"
    if max(queries.shape[0] * queries.shape[1], memory.shape[0] * memory.stride(0)) >= 2**31:
        return "tensors of 2^31 elements or more (int32 offsets)"
    return None


def topk_cosine(
    queries: torch.Tensor, memory: torch.Tensor, k: int, n_valid: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query over the first `n_valid` rows of `memory` (all rows by default).

    queries (Q, D), memory (N, D): fp32, bf16 or fp16, normalised or not; n_valid an int (a memory not yet full).
    Returns similarities (Q, k) fp32 (fp64 for fp64 inputs on the PyTorch path) sorted descending and indices (Q, k)
    int64. On the GPU the dots run in bf16/fp16 when an input is 16-bit or CUDA autocast is on, else in TF32; norms
    and similarities in fp32: indices may differ from an exact search among near-ties only. Not differentiable.
    """
    n_valid = memory.shape[0] if n_valid is None else int(n_valid)
    _check_inputs(queries, memory, k, n_valid)
    if queries.shape[0] == 0:
        dtype = torch.promote_types(queries.dtype, torch.float32)
        empty = torch.empty(0, k, device=queries.device, dtype=dtype)
        return empty, empty.long()
    with torch.no_grad():
        if use_triton("topk_cosine", queries, memory, unsupported=_unsupported(queries, memory, k)):
            return _topk_cosine_triton(queries, memory, k, n_valid)
        return topk_cosine_ref(queries, memory, k, n_valid, chunk_elems=TORCH_CHUNK_ELEMS)
