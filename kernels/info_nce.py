"""Multi-view InfoNCE against a queue of negatives (the Mugs instance and local-group losses).

The negatives are the same for every (teacher view, student crop) pair, so one pass over the queue per student row
serves both views: it gives the row's negative log-sum-exp and, when the student needs a gradient, the
softmax-weighted mean of the queue rows. With the queue constant, the loss and both gradients follow from those and
the two positives:
    pair (crop j, view i), d = LSE_neg - s_j . t_i / tau:   loss = softplus(d)
    dL/ds_j = sum_i w_ji sigmoid(d) (a_j - t_i) / tau,      a_j = sum_n softmax_n(s_j . Queue / tau) Queue_n
    dL/dt_i = -sum_j w_ji sigmoid(d) s_j / tau
The gradients are computed in the forward pass (Liger-Kernel's trick), so the backward is a scale by grad_output and
there is no second pass over the queue; under no_grad only the log-sum-exp pass runs.

The Triton path splits the queue across CTAs (grid = row blocks x splits, row block fastest); each CTA keeps a
flash-attention style (max, sum, acc) per row and writes it as a partial; a small second kernel, one program per
image, merges the partials with log-sum-exp algebra and forms the loss terms and gradients of that image's crops.
No (C*B x N) logits exist on the GPU.

The running max is rescaled lazily: only when some row's tile maximum exceeds it by more than 2^RESCALE_LOG2
(never after the first tile for unit vectors at tau = 0.2), so the common case costs no rescaling, and any input -
not only unit vectors, any tau - stays finite.
"""

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import TL_DTYPES, dot_dtype, dot_precision, launch_options, num_sms, use_triton
from kernels.multicrop import multicrop_mean, pair_weights

RESCALE_LOG2 = 8.0  # exp2(logit - running max) stays <= 2^8: no overflow in fp32 sums, fine as bf16 dot operand


@triton.jit
def _info_nce_queue_kernel(
    Student,  # (R, E), in DOT_DTYPE
    Queue,  # (N, E), in DOT_DTYPE
    PartM,  # (S, R) fp32: running max of the row's logits over the split, log2 units
    PartL,  # (S, R) fp32: sum of exp2(logit - max)
    PartAcc,  # (S, R, E) fp32: sum of exp2(logit - max) * queue row (WITH_ACC only)
    R,
    N,
    E,
    tiles_per_split,
    qk_scale,  # log2(e) / tau
    stride_s,
    stride_q,
    stride_pa_split,
    stride_pa_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    WITH_ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RESCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row block: fastest, so the CTAs reading one queue chunk are co-resident
    pid_s = tl.program_id(1)  # queue split
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    offs_n = tl.arange(0, BLOCK_N)
    s = tl.load(Student + rows[:, None] * stride_s + offs_e[None, :], mask=row_ok[:, None] & e_ok[None, :])

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    n_start = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(n_start + tiles_per_split * BLOCK_N, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N
        q = tl.load(Queue + cols[:, None] * stride_q + offs_e[None, :], mask=col_ok[:, None] & e_ok[None, :])
        z = tl.dot(s, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        z = tl.where(col_ok[None, :], z, float("-inf"))  # every tile holds a valid column: z_max is finite
        z_max = tl.max(z, axis=1)
        if tl.max(z_max - m_i, axis=0) > RESCALE:  # always on the first tile (m_i = -inf), rarely after
            m_new = tl.maximum(m_i, z_max)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            if WITH_ACC:
                acc = acc * alpha[:, None]
            m_i = m_new
        p = tl.exp2(z - m_i[:, None])
        l_i += tl.sum(p, axis=1)
        if WITH_ACC:
            acc = tl.dot(p.to(DOT_DTYPE), q, acc, input_precision=DOT_PRECISION)

    tl.store(PartM + pid_s * R + rows, m_i, mask=row_ok)
    tl.store(PartL + pid_s * R + rows, l_i, mask=row_ok)
    if WITH_ACC:
        out = pid_s * stride_pa_split + rows[:, None] * stride_pa_row + offs_e[None, :]
        tl.store(PartAcc + out, acc, mask=row_ok[:, None] & e_ok[None, :])


@triton.jit
def _info_nce_pairs_kernel(
    Student,  # (C*B, E), crop-major
    Teacher,  # (2*B, E), view-major
    PartM,  # (S, C*B)
    PartL,  # (S, C*B)
    PartAcc,  # (S, C*B, E)
    LossParts,  # (B,) fp32: this image's weighted loss terms
    GradStudent,  # (C*B, E)
    GradTeacher,  # (2*B, E)
    B,
    C,
    E,
    splits,
    inv_tau,
    w_global,  # weight of a (crop j < 2, view i != j) term: multicrop.pair_weights / B
    w_local,  # weight of a (crop j >= 2, view i) term
    stride_s,
    stride_t,
    stride_pa_split,
    stride_pa_row,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
):
    b = tl.program_id(0)  # one image: its C student crops and 2 teacher views
    crops = tl.arange(0, BLOCK_C)
    c_ok = crops < C
    rows = crops * B + b
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    ce_ok = c_ok[:, None] & e_ok[None, :]
    R = B * C

    m = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    for sp in range(splits):
        m = tl.maximum(m, tl.load(PartM + sp * R + rows, mask=c_ok, other=0.0))
    l_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_E), dtype=tl.float32)
    for sp in range(splits):
        scale = tl.exp2(tl.load(PartM + sp * R + rows, mask=c_ok, other=0.0) - m)
        l_sum += scale * tl.load(PartL + sp * R + rows, mask=c_ok, other=1.0)
        if GRAD_S:
            part = tl.load(PartAcc + sp * stride_pa_split + rows[:, None] * stride_pa_row + offs_e[None, :], mask=ce_ok)
            acc += scale[:, None] * part
    lse_neg = (m + tl.log2(l_sum)) * 0.6931471805599453  # natural-log units

    s = tl.load(Student + rows[:, None] * stride_s + offs_e[None, :], mask=ce_ok, other=0.0).to(tl.float32)
    t0 = tl.load(Teacher + b * stride_t + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    t1 = tl.load(Teacher + (B + b) * stride_t + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    d0 = lse_neg - tl.sum(s * t0[None, :], axis=1) * inv_tau  # (BLOCK_C,): LSE_neg - positive logit
    d1 = lse_neg - tl.sum(s * t1[None, :], axis=1) * inv_tau
    w_crop = tl.where(crops < 2, w_global, w_local)
    w0 = tl.where(c_ok & (crops != 0), w_crop, 0.0)  # crop 0 is view 0's own crop: no (0, 0) pair
    w1 = tl.where(c_ok & (crops != 1), w_crop, 0.0)
    softplus0 = tl.maximum(d0, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(d0)))
    softplus1 = tl.maximum(d1, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(d1)))
    tl.store(LossParts + b, tl.sum(w0 * softplus0 + w1 * softplus1, axis=0))

    g0 = w0 * inv_tau / (1.0 + tl.exp(-d0))  # w * (1 - P_pos) / tau, with 1 - P_pos = sigmoid(d)
    g1 = w1 * inv_tau / (1.0 + tl.exp(-d1))
    if GRAD_S:
        a = acc / l_sum[:, None]  # softmax-weighted mean of the queue rows
        grad_s = g0[:, None] * (a - t0[None, :]) + g1[:, None] * (a - t1[None, :])
        tl.store(GradStudent + rows[:, None] * stride_s + offs_e[None, :], grad_s, mask=ce_ok)
    if GRAD_T:
        tl.store(GradTeacher + b * stride_t + offs_e, -tl.sum(g0[:, None] * s, axis=0), mask=e_ok)
        tl.store(GradTeacher + (B + b) * stride_t + offs_e, -tl.sum(g1[:, None] * s, axis=0), mask=e_ok)


def info_nce_config(with_acc: bool, dot: torch.dtype, on_gpu: bool) -> dict:
    """Tile sizes of the queue pass for dots in `dot` (fixed, not autotuned: the compile-only test checks exactly
    these), E <= 256.

    With the gradient a CTA holds (BLOCK_M x E) fp32 accumulators (128 registers per thread at BLOCK_M = 128, 8 warps)
    next to its student rows, so the queue tiles are short; TF32 tiles take twice the registers, and only 32-row
    blocks stay free of spills on sm_80 and sm_90 with triton 3.6 and 3.9. The log-sum-exp-only pass has room for
    longer tiles. Under the interpreter small tiles, so that small test shapes span several blocks, tiles and splits.
    """
    if not on_gpu:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if dot == torch.float32:
        block_m, block_n = (32, 32) if with_acc else (128, 16)
    else:
        block_m, block_n = (128, 32) if with_acc else (128, 64)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 2}


MAX_WIDTH = 256  # a row block's student rows and accumulators live in registers (Mugs: 256)


def _num_splits(row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Splits of the queue so that about one wave of CTAs runs (they are register-bound: one CTA per SM)."""
    return max(1, min(triton.cdiv(num_sms(device), row_blocks), n_tiles))


def _info_nce_triton(
    student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float, grad_s: bool, grad_t: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Host launcher: the loss and, when asked, its gradients w.r.t. student and teacher.

    The queue pass reads student and queue in the dot dtype (a 16-bit copy of an fp32 queue is made here: keep the
    queue in 16 bits to save it); the pairs kernel reads student and teacher as given, in fp32 maths.
    """
    dot = dot_dtype(student, queue)
    partials = _queue_pass(student.to(dot).contiguous(), queue.to(dot).contiguous(), temperature, grad_s)
    return _pairs(student.contiguous(), teacher.contiguous(), partials, temperature, grad_s, grad_t)


def _queue_pass(
    student: torch.Tensor, queue: torch.Tensor, temperature: float, with_acc: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per queue split and student row: max and sum of exp of the logits, and with `with_acc` the exp-weighted sum of
    the queue rows. Returns (S, R), (S, R), (S, R, E) fp32 partials (a stand-in for the last without `with_acc`)."""
    rows, width = student.shape
    cfg = info_nce_config(with_acc, student.dtype, on_gpu=student.is_cuda)
    row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(queue.shape[0], cfg["BLOCK_N"])
    tiles_per_split = triton.cdiv(n_tiles, _num_splits(row_blocks, n_tiles, student.device))
    splits = triton.cdiv(n_tiles, tiles_per_split)

    f32 = {"device": student.device, "dtype": torch.float32}
    part_m, part_l = torch.empty(splits, rows, **f32), torch.empty(splits, rows, **f32)
    part_acc = torch.empty(splits, rows, width, **f32) if with_acc else torch.empty(1, 1, 1, **f32)
    _info_nce_queue_kernel[(row_blocks, splits)](
        student,
        queue,
        part_m,
        part_l,
        part_acc,
        rows,
        queue.shape[0],
        width,
        tiles_per_split,
        math.log2(math.e) / temperature,
        student.stride(0),
        queue.stride(0),
        part_acc.stride(0),
        part_acc.stride(1),
        BLOCK_E=max(16, triton.next_power_of_2(width)),
        WITH_ACC=with_acc,
        DOT_DTYPE=TL_DTYPES[student.dtype],
        DOT_PRECISION=dot_precision(),
        RESCALE=RESCALE_LOG2,
        **cfg,
        **launch_options(),
    )
    return part_m, part_l, part_acc


def _pairs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    temperature: float,
    grad_s: bool,
    grad_t: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Merge the partials and form the loss terms and gradients, one program per image."""
    part_m, part_l, part_acc = partials
    rows, width = student.shape
    batch = teacher.shape[0] // 2
    crops = rows // batch
    w_global, w_local = pair_weights(crops)  # of a pair's batch mean: / batch per image
    loss_parts = torch.empty(batch, device=student.device, dtype=torch.float32)
    grad_student = torch.empty_like(student) if grad_s else None
    grad_teacher = torch.empty_like(teacher) if grad_t else None
    _info_nce_pairs_kernel[(batch,)](
        student,
        teacher,
        part_m,
        part_l,
        part_acc,
        loss_parts,
        loss_parts if grad_student is None else grad_student,  # stand-ins: not written without the gradient
        loss_parts if grad_teacher is None else grad_teacher,
        batch,
        crops,
        width,
        part_m.shape[0],
        1 / temperature,
        w_global / batch,
        w_local / batch,
        student.stride(0),
        teacher.stride(0),
        part_acc.stride(0),
        part_acc.stride(1),
        BLOCK_C=triton.next_power_of_2(crops),
        BLOCK_E=max(16, triton.next_power_of_2(width)),
        GRAD_S=grad_s,
        GRAD_T=grad_t,
        num_warps=4,
        **launch_options(),
    )
    return loss_parts.sum(), grad_student, grad_teacher


class _InfoNCEFunction(torch.autograd.Function):
    """Gradients computed in the forward; the backward scales them by grad_output. The queue is a constant."""

    @staticmethod
    def forward(ctx, student, teacher, queue, temperature):
        loss, grad_s, grad_t = _info_nce_triton(
            student, teacher, queue, temperature, grad_s=ctx.needs_input_grad[0], grad_t=ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_s, grad_t)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_s, grad_t = ctx.saved_tensors
        grad_s = None if grad_s is None else grad_s * grad_output
        grad_t = None if grad_t is None else grad_t * grad_output
        return grad_s, grad_t, None, None


def info_nce_ref(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference: the Mugs InfoNCE over all (teacher view i, student crop j != i) pairs.

    student (C*B, E): crop-major rows, crops 0 and 1 global, the rest local. teacher (2*B, E): the targets of
    views 0 and 1. queue (N, E): negatives, a constant. For each pair the term is
    CE([s_j . t_i, s_j . queue] / tau, target 0), averaged over the batch; the result is their
    `multicrop_mean`: 0.5 * (mean over the 2 global pairs + mean over the 2 * (C - 2) local pairs), or the global
    mean alone when there are no local crops. Computed in fp32 (fp64 for fp64 inputs).
    """
    batch = teacher.shape[0] // 2
    crops = student.shape[0] // batch
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = student.to(dtype).reshape(crops, batch, -1)  # (C, B, E)
    t = teacher.to(dtype).reshape(2, batch, -1)  # (2, B, E)
    neg_lse = torch.logsumexp(s @ queue.to(dtype).T / temperature, dim=-1)  # (C, B)
    pos = torch.einsum("cbe,vbe->cvb", s, t) / temperature  # (C, 2, B)
    terms = (torch.logaddexp(pos, neg_lse[:, None]) - pos).mean(-1)  # (C, 2): loss of (crop j, view i)
    return multicrop_mean(terms.T)


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or queue.dim() != 2:
        raise ValueError(
            f"info_nce: expected student (C*B, E), teacher (2*B, E), queue (N, E), got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}, {tuple(queue.shape)}"
        )
    if not student.shape[1] == teacher.shape[1] == queue.shape[1]:
        raise ValueError(
            f"info_nce: widths differ: student {student.shape[1]}, teacher {teacher.shape[1]}, queue {queue.shape[1]}"
        )
    batch = teacher.shape[0] // 2
    if teacher.shape[0] % 2 or batch == 0 or student.shape[0] % batch or student.shape[0] < 2 * batch:
        raise ValueError(
            f"info_nce: teacher rows {teacher.shape[0]} must be 2*B > 0 and student rows {student.shape[0]} C*B "
            "with C >= 2 crops"
        )
    if queue.shape[0] == 0:
        raise ValueError("info_nce: the queue is empty")
    if not all(x.is_floating_point() for x in (student, teacher, queue)):
        raise TypeError(f"info_nce: expected float tensors, got {student.dtype}, {teacher.dtype}, {queue.dtype}")
    if not (student.device == teacher.device == queue.device):
        raise ValueError(f"info_nce: tensors on {student.device}, {teacher.device}, {queue.device}")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")


def _unsupported(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None."""
    if student.shape[1] > MAX_WIDTH:
        return f"width {student.shape[1]} > {MAX_WIDTH}"
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if any(x.dtype not in kernel_dtypes for x in (student, teacher, queue)):
        return f"dtypes {student.dtype} / {teacher.dtype} / {queue.dtype} (fp32, bf16, fp16 only)"
    if queue.numel() >= 2**31:
        return "a queue of 2^31 elements or more (int32 offsets)"
    return None


def info_nce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mugs multi-view InfoNCE (see `info_nce_ref`); gradients reach `student` and, if it requires grad, `teacher`.

    The queue is a constant (no gradient). On the GPU the dots run in bf16/fp16 when an input is 16-bit or CUDA
    autocast is on, else in TF32; log-sum-exps, loss and gradient algebra in fp32. Returns an fp32 scalar (fp64 for
    fp64 inputs on the PyTorch path).
    """
    temperature = float(temperature)
    _check_inputs(student, teacher, queue, temperature)
    queue = queue.detach()
    if not use_triton("info_nce", student, teacher, queue, unsupported=_unsupported(student, teacher, queue)):
        return info_nce_ref(student, teacher, queue, temperature)
    if torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad):
        return _InfoNCEFunction.apply(student, teacher, queue, temperature)
    return _info_nce_triton(student, teacher, queue, temperature, grad_s=False, grad_t=False)[0]
