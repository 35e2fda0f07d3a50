"""Collapse monitor: the standard signals of a self-distillation run, measured on one step per logging interval.

- `embedding_std`: the standard deviation across the batch of the teacher's L2-normalised instance embeddings,
  averaged over dimensions. Rows spread uniformly on the sphere give 1/sqrt(E); identical rows give 0.
- `group_entropy`: the entropy of the teacher's mean group assignment (softmax of its centred prototype logits at
  the teacher temperature, averaged over the batch). 0 when every row goes to one prototype; at most
  log(min(K, rows)) when sharp assignments spread over the batch.
- `group_row_entropy`: the mean entropy of the teacher's assignment of each row: small for a sharp teacher,
  log K for a flat one (the other DINO collapse: centring wins over sharpening, every row is uniform).
- `group_agreement`: the share of (teacher view, other student crop) pairs whose argmax prototypes agree, the
  pairs the group loss compares. Chance is about 1/K; it rises as the student learns the teacher's groups, and
  reaches 1 when all rows fall in one group (then `group_entropy` is 0).

`COLLAPSE_THRESHOLDS` says, for three of them, when the run counts as collapsed; agreement has no threshold of
its own (it is high in a healthy run too) and is logged to tell the failures apart. `CollapseMonitor` takes the
networks' outputs from forward hooks on the one step it is armed for, computes the signals there on the device
and keeps them as tensors: reading them is left to the logging interval's sync.
"""

import math
import operator
from typing import Any

import torch

from mugs_fast.mugs import Mugs

SIGNALS = ("embedding_std", "group_entropy", "group_row_entropy", "group_agreement")
# Collapsed when a signal divided by its healthy scale (`collapse_scales`) is below (<) or above (>) the value:
# - the embedding std below 0.2 / sqrt(E): rows spread evenly over n of the E dimensions give sqrt(n / E), so
#   this is less spread than 5 of 128 dimensions (a healthy 10-class embedding may sit near sqrt(10 / 128) =
#   0.28); a collapse to one point gives 0;
# - the mean assignment's entropy below a tenth of log(min(K, rows)): about one prototype left for the batch;
# - the rows' entropy above 0.9 log K: every teacher row spread over most prototypes, i.e. flat (the demo's
#   data drives the group head there within 100 steps without BatchNorm in the heads; the group loss then
#   climbs to log K).
COLLAPSE_THRESHOLDS = {"embedding_std": ("<", 0.2), "group_entropy": ("<", 0.1), "group_row_entropy": (">", 0.9)}
_COMPARE = {"<": operator.lt, ">": operator.gt}
_DESCRIPTIONS = {
    "embedding_std": "teacher embedding std",
    "group_entropy": "entropy of the mean group assignment",
    "group_row_entropy": "entropy of each teacher row's group assignment",
}


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """(N, E) L2-normalised rows, N >= 2 -> scalar: the per-dimension std across rows, averaged over dimensions."""
    return z.float().std(dim=0).mean()


def assignment_entropies(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) centred prototype logits -> entropies (nats) of softmax(logits / temperature): of the batch mean
    (scalar) and the mean over rows of each row's (scalar)."""
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (N, K)
    mean = p.mean(dim=0)  # (K,)
    return -torch.special.xlogy(mean, mean).sum(), -torch.special.xlogy(p, p).sum(dim=-1).mean()


def group_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Student (C*B, K) and teacher (2*B, K) logits, crop-major rows -> scalar: the share of pairs (teacher view
    i, student crop j != i) whose argmax prototypes are equal."""
    batch = teacher.shape[0] // 2
    t = teacher.argmax(dim=-1).view(2, 1, batch)  # (2, 1, B)
    s = student.argmax(dim=-1).view(-1, batch)  # (C, B)
    same = (t == s.unsqueeze(0)).float()  # (2, C, B)
    other = torch.ones(2, s.shape[0], 1, device=same.device)
    other[0, 0] = other[1, 1] = 0  # a teacher view is not compared with the student's copy of the same view
    return (same * other).sum() / (other.sum() * batch)


def collapse_scales(embed_dim: int, num_prototypes: int, rows: int) -> dict[str, float]:
    """The healthy scale of each thresholded signal: 1/sqrt(E), log(min(K, rows)) and log K."""
    return {
        "embedding_std": 1 / math.sqrt(embed_dim),
        "group_entropy": math.log(max(2, min(num_prototypes, rows))),
        "group_row_entropy": math.log(max(2, num_prototypes)),
    }


def collapsed_signals(record: dict[str, Any], scales: dict[str, float]) -> dict[str, float]:
    """The signals of a logged record past their collapse threshold, as fractions of their healthy scale."""
    ratios = {k: record[k] / scales[k] for k in COLLAPSE_THRESHOLDS if k in record and k in scales}
    return {k: r for k, r in ratios.items() if _COMPARE[COLLAPSE_THRESHOLDS[k][0]](r, COLLAPSE_THRESHOLDS[k][1])}


class CollapseMonitor:
    """The signals of one step per logging interval, from forward hooks on a `Mugs` model's two networks.

    `arm(teacher_temp)` before a step: that step's teacher and student forwards give the signals (computed on
    the device, no sync), `take()` hands them over as tensors. Unarmed steps cost one `if` per forward.
    `warning(record)` gives the one-line collapse warning the first time a logged record crosses a threshold.
    """

    def __init__(self, model: Mugs) -> None:
        """Hooks `model.teacher` and `model.student` (the plain networks, also under DDP)."""
        cfg = model.cfg
        self.model = model
        self.scales = collapse_scales(cfg.instance_out_dim, cfg.group_out_dim, 2 * cfg.batch_size_per_gpu)
        self.warned = False
        self._temp: float | None = None
        self._teacher: dict[str, torch.Tensor] | None = None
        self._values: dict[str, torch.Tensor] = {}
        self._hooks = [
            model.teacher.register_forward_hook(self._on_teacher),
            model.student.register_forward_hook(self._on_student),
        ]

    def arm(self, teacher_temp: float) -> None:
        """Measure the next step (its group loss's teacher temperature: `teacher_temp`)."""
        self._temp = teacher_temp

    def take(self) -> dict[str, torch.Tensor]:
        """The signals of the last armed step, as 0-d device tensors (empty when none was measured since)."""
        values, self._values = self._values, {}
        return values

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _on_teacher(self, module: torch.nn.Module, args: Any, out: dict[str, torch.Tensor]) -> None:
        if self._temp is not None:
            self._teacher = {k: out[k].detach() for k in ("instance", "group") if k in out}

    @torch.no_grad()
    def _on_student(self, module: torch.nn.Module, args: Any, out: dict[str, torch.Tensor]) -> None:
        if self._teacher is None or self._temp is None:
            return
        t, temp, self._teacher, self._temp = self._teacher, self._temp, None, None
        values = {}
        if "instance" in t:
            values["embedding_std"] = embedding_std(t["instance"])
        if "group" in t:
            centred = t["group"].float() - self.model.group_loss.center  # (2B, K): the group loss's targets
            values["group_entropy"], values["group_row_entropy"] = assignment_entropies(centred, temp)
            values["group_agreement"] = group_agreement(out["group"].detach(), centred)
        self._values = values

    def warning(self, record: dict[str, Any]) -> str | None:
        """The collapse warning for a logged record, the first time one crosses a threshold; else None."""
        low = collapsed_signals(record, self.scales)
        if self.warned or not low:
            return None
        self.warned = True
        parts = [
            f"{_DESCRIPTIONS[k]} {record[k]:.3g} = {ratio:.2f} x {self.scales[k]:.3g} (collapsed when "
            f"{' '.join(map(str, COLLAPSE_THRESHOLDS[k]))})"
            for k, ratio in low.items()
        ]
        agreement = f", group agreement {record['group_agreement']:.2f}" if "group_agreement" in record else ""
        return (
            f"mugs-train: warning: the run is collapsing at step {record['step']}: {'; '.join(parts)}{agreement}. "
            "The losses no longer train the features; see 'Collapse monitor' in the README"
        )
