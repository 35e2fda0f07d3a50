"""Multi-view InfoNCE against a queue of negatives (the Mugs instance and local-group losses)."""

import torch


def info_nce_ref(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference: the Mugs InfoNCE over all (teacher view i, student crop j != i) pairs.

    student (C*B, E): crop-major rows, crops 0 and 1 global, the rest local. teacher (2*B, E): the targets of
    views 0 and 1. queue (N, E): negatives, a constant. For each pair the term is
    CE([s_j . t_i, s_j . queue] / tau, target 0), averaged over the batch; the result is
    0.5 * (mean over the 2 global pairs + mean over the 2 * (C - 2) local pairs), or the global mean alone
    when there are no local crops. Computed in fp32 (fp64 for fp64 inputs).
    """
    batch = teacher.shape[0] // 2
    crops = student.shape[0] // batch
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = student.to(dtype).view(crops, batch, -1)  # (C, B, E)
    t = teacher.to(dtype).view(2, batch, -1)  # (2, B, E)
    neg_lse = torch.logsumexp(s @ queue.to(dtype).T / temperature, dim=-1)  # (C, B)
    pos = torch.einsum("cbe,vbe->cvb", s, t) / temperature  # (C, 2, B)
    terms = (torch.logaddexp(pos, neg_lse[:, None]) - pos).mean(-1)  # (C, 2): loss of (crop j, view i)
    global_mean = (terms[1, 0] + terms[0, 1]) / 2
    if crops == 2:
        return global_mean
    return 0.5 * (global_mean + terms[2:].mean())


def info_nce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mugs multi-view InfoNCE (see `info_nce_ref`); gradients reach `student` and, if it requires grad, `teacher`."""
    return info_nce_ref(student, teacher, queue, temperature)
