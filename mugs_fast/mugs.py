"""Mugs: student and teacher networks, their memories, queues and losses, and one training step.

A step (`train_step`) is: schedules -> teacher forward (no grad) -> student forward -> losses (fp32) ->
backward -> buffer writes -> per-tensor clipping -> last-layer freeze -> optimizer step -> EMA teacher.
Nothing in it synchronises the host with the GPU; `Mugs.nonfinite_report()` is the one call that does, for the
trainer's logging interval.
"""

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mugs_fast.config import MugsConfig
from mugs_fast.heads import GroupHead, ProjectionHead
from mugs_fast.losses import GroupLoss, InfoNCELoss
from mugs_fast.memory import FeatureMemory, FeatureQueue
from mugs_fast.optim import (
    Schedules,
    apply_schedules,
    cancel_last_layer_gradients,
    clip_gradients,
    clip_threshold,
    ema_update,
)
from mugs_fast.runtime import autocast, compute_dtype
from mugs_fast.vit import ARCHS, build_backbone

LOSS_NAMES = ("instance-sup.", "local-group-sup.", "group-sup.")  # the release's log names, in weight order


class MugsNetwork(nn.Module):
    """Student or teacher: backbone + the heads of the enabled supervisions (keys as the release's, spec 9.2).

    The teacher's instance and local-group heads have no predictor; it is built with drop path 0.
    """

    def __init__(self, cfg: MugsConfig, *, student: bool) -> None:
        super().__init__()
        dim = ARCHS[cfg.arch][0]
        pred_hidden = cfg.pred_hidden_dim if student else 0
        self.top_k = cfg.local_group_knn_top_n
        self.backbone = build_backbone(
            cfg.arch,
            patch_size=cfg.patch_size,
            img_size=cfg.global_crop_size,
            depth=cfg.depth,
            drop_path_rate=cfg.drop_path_rate if student else 0.0,
            num_relation_blocks=int(cfg.use_local_group),
        )
        head = dict(
            hidden_dim=cfg.head_hidden_dim,
            pred_hidden_dim=pred_hidden,
            use_bn=cfg.use_bn_in_head,
            norm_before_pred=cfg.norm_before_pred,
        )
        self.instance_head = ProjectionHead(dim, cfg.instance_out_dim, **head) if cfg.use_instance else None
        self.local_group_head = ProjectionHead(dim, cfg.local_group_out_dim, **head) if cfg.use_local_group else None
        self.group_head = (
            GroupHead(
                dim,
                cfg.group_out_dim,
                cfg.head_hidden_dim,
                cfg.group_bottleneck_dim,
                use_bn=cfg.use_bn_in_head,
                norm_last_layer=cfg.norm_last_layer,
            )
            if cfg.use_group
            else None
        )

    def forward(self, crops: list[torch.Tensor], memory: FeatureMemory | None = None) -> dict[str, torch.Tensor]:
        """Crops grouped by resolution, global group first, rows crop-major: [(2B,3,G,G), (L*B,3,l,l)].

        Returns the rows of all crops in order: `instance` and `local_group` (C*B, E) normalised,
        `group` (C*B, K) logits, for the enabled heads; and `mean_patch` (2B, D), the detached mean of the
        global crops' patch tokens after the final LN (what the memories store).
        """
        memory = memory if self.local_group_head is not None else None
        cls_tokens, relation_tokens = [], []
        mean_patch = None
        for x in crops:  # one backbone call per resolution
            tokens, relation = self.backbone.forward_mugs(x, memory, self.top_k)  # (N, 1+P, D), (N, D) | None
            cls_tokens.append(tokens[:, 0])
            if relation is not None:
                relation_tokens.append(relation)
            if mean_patch is None:
                mean_patch = tokens[:, 1:].mean(dim=1).detach()
        cls = torch.cat(cls_tokens)  # (C*B, D)
        out = {"mean_patch": mean_patch}
        if self.instance_head is not None:
            out["instance"] = self.instance_head(cls)
        if self.local_group_head is not None:
            out["local_group"] = self.local_group_head(torch.cat(relation_tokens))
        if self.group_head is not None:
            out["group"] = self.group_head(cls)
        return out


class Mugs(nn.Module):
    """The whole Mugs state: `student` and `teacher` networks, memories, queues and the group-loss centre.

    A supervision with weight 0 has no head, queue, memory (or relation block) at all. `student` and `teacher`
    are always the plain networks (parameters, hooks, checkpoints); `prepare()` readies them for a run, and the
    student's forward then goes through its DistributedDataParallel wrapper when there is one.
    `state_dict()` holds everything; `checkpoint.release_entries()` gives the release's checkpoint layout.
    """

    def __init__(self, cfg: MugsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = MugsNetwork(cfg, student=True)
        self.teacher = MugsNetwork(cfg, student=False)
        missing, unexpected = self.teacher.load_state_dict(self.student.state_dict(), strict=False)
        if missing or not all(".predictor." in k for k in unexpected):  # only the student's predictors are extra
            raise RuntimeError(f"teacher/student mismatch: missing {missing}, unexpected {unexpected}")
        self.teacher.requires_grad_(False)

        dim = ARCHS[cfg.arch][0]
        lg = cfg.use_local_group
        memory = dict(official_pointer=cfg.official_memory_pointer, precision=cfg.precision)
        self.student_memory = FeatureMemory(cfg.local_group_queue_size, dim, **memory) if lg else None
        self.teacher_memory = FeatureMemory(cfg.local_group_queue_size, dim, **memory) if lg else None
        self.instance_queue = FeatureQueue(cfg.instance_queue_size, cfg.instance_out_dim) if cfg.use_instance else None
        self.local_group_queue = FeatureQueue(cfg.local_group_queue_size, cfg.local_group_out_dim) if lg else None
        self.instance_loss = InfoNCELoss(cfg.instance_temp) if cfg.use_instance else None
        self.local_group_loss = InfoNCELoss(cfg.local_group_temp) if lg else None
        self.group_loss = GroupLoss(cfg.group_out_dim, cfg.group_student_temp) if cfg.use_group else None

        # First step whose loss was non-finite (-1: none yet) and which of [*LOSS_NAMES, total] it was.
        self.register_buffer("nonfinite_step", torch.full((1,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("nonfinite_flags", torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.bool), persistent=False)
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._student_ddp: DistributedDataParallel | None = None  # the student's forward when distributed

    def __setattr__(self, name: str, value) -> None:
        if name == "_student_ddp":  # outside the module tree: the wrapper holds the student's own parameters
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def prepare(self, *, distributed: bool = False, compile: bool = False) -> None:
        """Readies both networks for a run, in place; call it after `.to(device)` and any restore.

        distributed: BatchNorm in the heads becomes SyncBatchNorm in both networks (as in the release), and the
        student's forward goes through DistributedDataParallel (device_ids from the student's device).
        compile: the transformer blocks of both networks are compiled in place (parameter names stay the same).
        The parameters stay the same objects, so an optimizer built before and the EMA pairs are unaffected.
        """
        if distributed and self.cfg.use_bn_in_head:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        if compile:
            for network in (self.student, self.teacher):
                network.backbone.blocks.compile()
        if distributed:
            device = next(self.student.parameters()).device
            ids = [device.index] if device.type == "cuda" else None
            self._student_ddp = DistributedDataParallel(self.student, device_ids=ids, gradient_as_bucket_view=True)

    # ---- forward and losses ----

    @torch.no_grad()
    def forward_teacher(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher crops (2B, 3, G, G) -> teacher outputs (see `MugsNetwork.forward`); queries the teacher memory."""
        return self.teacher([crops], self.teacher_memory)

    def forward_student(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Student crops (2B, 3, G, G) and (L*B, 3, l, l) -> student outputs; queries the student memory."""
        crops = [global_crops] if local_crops is None or local_crops.numel() == 0 else [global_crops, local_crops]
        student = self.student if self._student_ddp is None else self._student_ddp
        return student(crops, self.student_memory)

    def losses(
        self, s: dict[str, torch.Tensor], t: dict[str, torch.Tensor], teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """The enabled losses by their release names, and `loss` = sum_i w_i L_i / sum_i w_i; fp32, no autocast."""
        out = {}
        with torch.autocast(s["mean_patch"].device.type, enabled=False):
            if self.instance_loss is not None:
                out["instance-sup."] = self.instance_loss(s["instance"], t["instance"], self.instance_queue.queue)
            if self.local_group_loss is not None:
                out["local-group-sup."] = self.local_group_loss(
                    s["local_group"], t["local_group"], self.local_group_queue.queue
                )
            if self.group_loss is not None:
                out["group-sup."] = self.group_loss(s["group"], t["group"], teacher_temp)
        weights = dict(zip(LOSS_NAMES, self.cfg.loss_weights, strict=True))
        out["loss"] = sum(weights[k] * v for k, v in out.items()) / sum(weights[k] for k in out)
        return out

    @torch.no_grad()
    def update_buffers(self, s: dict[str, torch.Tensor], t: dict[str, torch.Tensor], weak: torch.Tensor) -> None:
        """The step's writes, in the release's order: instance queue (view 0, then 1), local-group queue,
        group centre, student memory (global crop 0 of the images whose student crops were weak), teacher
        memory (teacher crop 0 of every image). All are gathered / reduced over ranks.

        Call it after `backward()`: the reference InfoNCE keeps the queue for its backward (the release copies
        both queues every step instead). Nothing else reads these buffers between the losses and the backward,
        so the result is the release's.
        """
        batch = weak.shape[0]
        if self.instance_queue is not None:
            self.instance_queue.enqueue(t["instance"].view(2, batch, -1))
        if self.local_group_queue is not None:
            self.local_group_queue.enqueue(t["local_group"].view(2, batch, -1))
        if self.group_loss is not None:
            self.group_loss.update_center(t["group"])
        if self.student_memory is not None:
            self.student_memory.write(s["mean_patch"][:batch], keep=weak)
            self.teacher_memory.write(t["mean_patch"][:batch])

    # ---- teacher update and monitoring ----

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher params, matching student params) by name: backbone (relation block included), projectors,
        group head; the student predictors have no teacher copy. Cached after the first call."""
        if self._ema_pairs is None:
            student = dict(self.student.named_parameters())
            names, teacher = zip(*self.teacher.named_parameters(), strict=True)
            self._ema_pairs = (list(teacher), [student[n] for n in names])
        return self._ema_pairs

    @torch.no_grad()
    def track_nonfinite(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """Remember (on the device) the first step with a non-finite loss and which losses it was."""
        total = losses["loss"]
        values = torch.stack([losses.get(k, torch.zeros_like(total)).detach() for k in LOSS_NAMES] + [total.detach()])
        bad = ~torch.isfinite(values)
        first = (self.nonfinite_step < 0) & bad.any()
        self.nonfinite_step.copy_(torch.where(first, step, self.nonfinite_step))
        self.nonfinite_flags.copy_(torch.where(first, bad, self.nonfinite_flags))

    def nonfinite_report(self) -> str | None:
        """None while every loss so far was finite, else a message naming the step and the losses.

        Syncs with the GPU (.item()): call it at the logging interval and before saving a checkpoint.
        """
        step = int(self.nonfinite_step.item())  # sync
        if step < 0:
            return None
        names = [n for n, bad in zip((*LOSS_NAMES, "loss"), self.nonfinite_flags.tolist(), strict=True) if bad]
        return f"non-finite loss at step {step}: {', '.join(names)}"


def train_step(
    model: Mugs, optimizer: torch.optim.Optimizer, schedules: Schedules, batch: dict[str, torch.Tensor], step: int
) -> dict[str, torch.Tensor | float]:
    """One Mugs optimisation step on a batch as the loaders deliver it, at global step `step` (0-based).

    batch: `teacher` (2B,3,G,G), `student_global` (2B,3,G,G), `student_local` (L*B,3,l,l), crop-major rows,
    and `weak` (B,) bool, all on the training device (other keys, e.g. `label`, are ignored).
    Returns the losses present (`loss`, `instance-sup.`, `local-group-sup.`, `group-sup.`) and `weak_ratio` as
    device tensors (reading them syncs: do it at the logging interval), and `lr`, `wd`, `momentum`,
    `teacher_temp` as floats. No host sync happens inside.
    """
    cfg = model.cfg
    epoch = step // schedules.iters_per_epoch  # host ints and host schedule arrays: no GPU value is read
    lr, wd = apply_schedules(optimizer, schedules, step, cfg.patch_embed_lr_mult)
    momentum, teacher_temp = float(schedules.momentum[step]), float(schedules.teacher_temp[step])

    # forward: teacher under no_grad, then student; one backbone call per crop resolution
    device = batch["teacher"].device
    with autocast(compute_dtype(cfg.precision, device), device):
        t_out = model.forward_teacher(batch["teacher"])
        s_out = model.forward_student(batch["student_global"], batch.get("student_local"))
    losses = model.losses(s_out, t_out, teacher_temp)

    # backward, then the queue / centre / memory writes (see Mugs.update_buffers for why after backward)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    model.update_buffers(s_out, t_out, batch["weak"])  # weak-only writes masked on the GPU (release: nonzero, a sync)

    # update: per-tensor clipping, then the last-layer freeze, the optimizer and the EMA teacher
    student = model.student
    if cfg.clip_grad:  # foreach norms and scales on the GPU (the release reads each norm with .item(), a sync)
        clip_gradients(student.parameters(), clip_threshold(cfg, epoch))
    if epoch < cfg.freeze_last_layer:
        cancel_last_layer_gradients(student)
    optimizer.step()
    ema_update(*model.ema_pairs(), momentum)

    model.track_nonfinite(losses, step)  # the release's isfinite(loss.item()) check, kept on the GPU
    metrics: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in losses.items()}
    metrics.update(weak_ratio=batch["weak"].float().mean(), lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp)
    return metrics
