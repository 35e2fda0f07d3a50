"""Matmul FLOPs of one Mugs training step, per image, counted from the config (for MFU).

Model FLOPs, as MFU is usually stated: 2 FLOPs per multiply-add of every matrix product (linear layers, the patch
embedding, attention's QK^T and AV, the memory search, the loss GEMMs); element-wise work (norms, softmax, GELU,
the optimizer, the EMA) is not counted, nor flash attention's recomputation of QK^T in its backward pass.

With width D, depth L and N tokens per crop (1 + patches), one transformer block costs 24*N*D^2 (qkv 6, proj 2,
MLP 16) + 4*N^2*D (QK^T and AV) forward. A backward pass costs twice its forward, except where an input needs no
gradient: the patch embedding (the images) and the InfoNCE queue GEMM (the queue) cost once their forward, the
memory search (no gradient) nothing. Per image:
    teacher   2 global crops, forward: backbone + relation block + top-k search + its heads (no predictors)
    student   2 global + L local crops, forward and backward, + the top-k search of every crop
    losses    per student crop: both InfoNCE queue GEMMs (forward + backward) and the positives, the group loss's
              cross term (forward + backward)
"""

from mugs_fast.config import MugsConfig
from mugs_fast.vit import ARCHS

MLP_RATIO = 4


def block_flops(tokens: int, dim: int) -> int:
    """Forward FLOPs of one ViT block on one sequence of `tokens` tokens of width `dim`."""
    linear = 2 * tokens * dim * dim * (3 + 1 + 2 * MLP_RATIO)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV over all heads
    return linear + attention


def mlp_flops(*widths: int) -> int:
    """Forward FLOPs of a chain of linear layers widths[0] -> widths[1] -> ... for one row."""
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:], strict=False))


def _crop_flops(cfg: MugsConfig, crop_size: int, *, student: bool) -> dict[str, int]:
    """Forward FLOPs of one crop through one network, by part: backbone, patch embedding, relation, search, heads."""
    dim, arch_depth, _ = ARCHS[cfg.arch]
    depth = cfg.depth or arch_depth
    patches = (crop_size // cfg.patch_size) ** 2
    out = {
        "patch_embed": 2 * patches * 3 * cfg.patch_size**2 * dim,
        "blocks": depth * block_flops(patches + 1, dim),
        "relation": 0,
        "search": 0,
        "heads": 0,
    }
    hidden, pred = cfg.head_hidden_dim, cfg.pred_hidden_dim
    for used, out_dim in ((cfg.use_instance, cfg.instance_out_dim), (cfg.use_local_group, cfg.local_group_out_dim)):
        if used:
            out["heads"] += mlp_flops(dim, hidden, hidden, out_dim)
            out["heads"] += mlp_flops(out_dim, pred, out_dim) if student and pred > 0 else 0
    if cfg.use_group:
        out["heads"] += mlp_flops(dim, hidden, hidden, cfg.group_bottleneck_dim, cfg.group_out_dim)
    if cfg.use_local_group:
        out["relation"] = block_flops(1 + cfg.local_group_knn_top_n, dim)
        out["search"] = 2 * cfg.local_group_queue_size * dim  # cosine against every memory row
    return out


def _loss_flops(cfg: MugsConfig) -> int:
    """Forward + backward FLOPs of the losses for one student crop (each paired with both teacher views)."""
    flops = 0
    for used, queue, width in (
        (cfg.use_instance, cfg.instance_queue_size, cfg.instance_out_dim),
        (cfg.use_local_group, cfg.local_group_queue_size, cfg.local_group_out_dim),
    ):
        if used:  # one queue GEMM shared by both views, and the two positives; backward to the student only
            flops += 2 * (2 * queue * width + 2 * 2 * width)
    if cfg.use_group:  # cross term q_v . s over the prototypes, for both views; backward to the student only
        flops += 2 * (2 * 2 * cfg.group_out_dim)
    return flops


def step_flops_per_image(cfg: MugsConfig) -> dict[str, float]:
    """Matmul FLOPs of one training step per image, by part, and `total` (see the module docstring).

    Parts: `teacher` (forward of the 2 global crops), `student_backbone` (blocks and patch embedding, forward and
    backward, all crops), `student_heads` (heads and relation block, forward and backward), `search` (top-k over
    the memories, both networks), `losses`.
    """
    global_crop = _crop_flops(cfg, cfg.global_crop_size, student=True)
    local_crop = _crop_flops(cfg, cfg.size_crops[0], student=True)
    teacher_crop = _crop_flops(cfg, cfg.global_crop_size, student=False)
    student_crops = [global_crop] * 2 + [local_crop] * cfg.local_crops_number

    parts = {
        "teacher": 2 * sum(v for k, v in teacher_crop.items() if k != "search"),
        "student_backbone": sum(3 * c["blocks"] + 2 * c["patch_embed"] for c in student_crops),
        "student_heads": sum(3 * (c["heads"] + c["relation"]) for c in student_crops),
        "search": 2 * teacher_crop["search"] + sum(c["search"] for c in student_crops),
        "losses": len(student_crops) * _loss_flops(cfg),
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts
