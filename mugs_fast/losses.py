"""The three Mugs supervisions (spec 5): tensors in, a scalar out; no loss writes a buffer.

Rows are crop-major: student (C*B, ...) = [global 0; global 1; local 0; ...], teacher (2*B, ...) = [view 0; view 1].
Teacher view i is paired with every student crop j != i, and each loss is their `kernels.multicrop.multicrop_mean`:
0.5 * (mean over the 2 global pairs + mean over the 2*(C-2) local pairs) (the global mean alone when C = 2).
Losses are computed in fp32 whatever the input dtype (fp64 stays fp64, for tests).
"""

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.multicrop import multicrop_mean
from mugs_fast.distributed import all_reduce_mean


class InfoNCELoss(nn.Module):
    """Instance and local-group supervision: per pair, CE([s_j . t_i, s_j . queue] / tau, target 0).

    The queue (N, E) holds the negatives (rows); it is the caller's buffer, read only. Gradients reach the
    student rows only (the teacher targets are detached). Computed by `kernels.info_nce`.
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """student (C*B, E), teacher (2*B, E), both L2-normalised; queue (N, E) -> scalar."""
        return kernels.info_nce(student, teacher.detach(), queue, self.temperature)


class GroupLoss(nn.Module):
    """Group supervision (DINO loss): per pair, -sum_k softmax((t_i - c) / tau_t)_k * log_softmax(s_j / tau_s)_k.

    Holds the centre c (1, K), zero at first; `update_center` (a separate, explicit write) moves it towards the
    all-reduced batch mean of the teacher logits with momentum 0.9.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """student (C*B, K), teacher (2*B, K) prototype logits -> scalar."""
        dtype = torch.promote_types(student.dtype, torch.float32)
        batch = teacher.shape[0] // 2
        s = (student.to(dtype) / self.student_temp).view(-1, batch, student.shape[-1])  # (C, B, K)
        with torch.no_grad():
            t = (teacher.to(dtype) - self.center) / teacher_temp
            q = F.softmax(t, dim=-1).view(2, batch, -1)  # (2, B, K)
        # -sum_k q_k log_softmax(s)_k = logsumexp(s) - q . s, because sum_k q_k = 1
        cross = torch.einsum("vbk,cbk->vcb", q, s)  # (2, C, B)
        terms = (torch.logsumexp(s, dim=-1).unsqueeze(0) - cross).mean(-1)  # (2, C)
        return multicrop_mean(terms)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """teacher (2*B, K) logits of this rank; the mean is taken over all ranks' rows."""
        batch_center = all_reduce_mean(teacher.float().mean(dim=0, keepdim=True))  # (1, K)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
