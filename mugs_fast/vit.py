"""The Mugs backbone: timm's VisionTransformer plus the relation ("local-group") block and its memory query.

The parameter names are timm's (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.*`, `norm.*`), which
are also the release's, plus `relation_blocks.0.*`; dropping the relation block gives a plain timm ViT.
"""

import math
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import nn

# arch -> (width D, depth, heads); patch 16, MLP ratio 4, qkv bias, LayerNorm eps 1e-6 for all.
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


class NeighbourSource(Protocol):
    """What the relation block needs from a memory (implemented by `mugs_fast.memory.FeatureMemory`)."""

    def retrieve(self, queries: torch.Tensor, k: int) -> torch.Tensor: ...


class MugsViT(VisionTransformer):
    """timm ViT whose tokens adapt to any square crop size (DINO's position-embedding interpolation) and which
    carries the Mugs relation block.

    `forward_features` / `forward` / `forward_cls` are the plain ViT (the release's `forward_knn`: CLS token after
    the final LayerNorm, relation block skipped); `forward_mugs` is the training forward with the memory query.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        *,
        patch_size: int = 16,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        num_relation_blocks: int = 1,
    ) -> None:
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
        )
        self.patch_embed.strict_img_size = False  # any multiple of the patch size; positions are interpolated
        trunc_normal_(self.cls_token, std=0.02)  # the release's init (timm uses N(0, 1e-6))
        # The release gives the relation block the drop-path rate of block 0, which is 0.
        self.relation_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(num_relation_blocks)
        )
        self.relation_blocks.apply(init_weights_vit_timm)

    def interpolate_pos_encoding(self, num_patches: int) -> torch.Tensor:
        """Position embeddings (1, 1+P, D) for a square grid of P patches (DINO's bicubic resize, +0.1 trick)."""
        n_ref = self.pos_embed.shape[1] - 1
        if num_patches == n_ref:
            return self.pos_embed
        side, ref = math.isqrt(num_patches), math.isqrt(n_ref)
        if side * side != num_patches:
            raise ValueError(f"only square crops are supported, got {num_patches} patches")
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, ref, ref, dim).permute(0, 3, 1, 2)  # (1, D, ref, ref)
        scale = (side + 0.1) / ref  # scale_factor (not size) as in DINO, for bit-compatible positions
        grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic")  # (1, D, side, side)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, num_patches, dim)], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (N, P, D) -> tokens with CLS and positions (N, 1+P, D); overrides timm's fixed-size one."""
        n, p, _ = x.shape
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        return self.pos_drop(x + self.interpolate_pos_encoding(p))

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> CLS token after the final LayerNorm (N, D); no relation block (kNN, export)."""
        return self.forward_features(x)[:, 0]

    def forward_mugs(
        self, x: torch.Tensor, memory: NeighbourSource | None, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (N, 3, H, W) -> (all tokens after the final LN (N, 1+P, D), relation output (N, D) or None).

        The relation output exists when a memory is given: the query is the mean of all tokens (CLS included)
        *before* the final LN; the sequence [query; its top_k stored neighbours] (no positions) goes through the
        relation block(s), and output token 0 goes through the shared final LN. Only token 0 carries a gradient.
        """
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x = self.blocks(x)  # (N, 1+P, D), before the final norm
        relation = None
        if memory is not None and len(self.relation_blocks) > 0:
            query = x.mean(dim=1)  # (N, D)
            neighbours = memory.retrieve(query, top_k)  # (N, k, D) stored fp32 rows, no gradient
            r = torch.cat([query.unsqueeze(1), neighbours.to(query.dtype)], dim=1)  # (N, 1+k, D)
            for blk in self.relation_blocks:
                r = blk(r)
            relation = self.norm(r[:, 0])
        return self.norm(x), relation


def build_backbone(
    arch: str,
    *,
    patch_size: int = 16,
    img_size: int = 224,
    depth: int = 0,
    drop_path_rate: float = 0.0,
    num_relation_blocks: int = 1,
) -> MugsViT:
    """A Mugs ViT by the release's name (`vit_small`, ...); `depth` > 0 overrides the architecture's depth."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    width, arch_depth, heads = ARCHS[arch]
    return MugsViT(
        width,
        depth or arch_depth,
        heads,
        patch_size=patch_size,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        num_relation_blocks=num_relation_blocks,
    )
