import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mugs_fast.vit import ARCHS, MugsViT, build_backbone


def _timm_vit(arch: str, **kwargs) -> VisionTransformer:
    dim, depth, heads = ARCHS[arch]
    kwargs = {"depth": depth, **kwargs}
    return VisionTransformer(patch_size=16, embed_dim=dim, num_heads=heads, num_classes=0, **kwargs)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_keys_are_timms_plus_relation_block(arch):
    with torch.device("meta"):
        ours = build_backbone(arch).state_dict()
        timm_sd = _timm_vit(arch).state_dict()
    plain = {k: v.shape for k, v in ours.items() if not k.startswith("relation_blocks.")}
    assert plain == {k: v.shape for k, v in timm_sd.items()}
    relation = {k.removeprefix("relation_blocks.0."): v.shape for k, v in ours.items() if k.startswith("relation_")}
    assert relation == {k.removeprefix("blocks.0."): v.shape for k, v in timm_sd.items() if k.startswith("blocks.0.")}
    assert ours["pos_embed"].shape == (1, 197, ARCHS[arch][0])


def test_vit_small_parameter_counts():
    with torch.device("meta"):
        vit = build_backbone("vit_small")
    relation = sum(p.numel() for p in vit.relation_blocks.parameters())
    assert sum(p.numel() for p in vit.parameters()) - relation == 21_665_664
    assert relation == 1_774_464


def test_init_and_drop_path():
    torch.manual_seed(0)
    vit = build_backbone("vit_small", depth=3, drop_path_rate=0.1)
    assert 0.015 < vit.cls_token.std() < 0.025  # trunc_normal(0.02), not timm's N(0, 1e-6)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])
    assert isinstance(vit.relation_blocks[0].drop_path1, torch.nn.Identity)
    assert vit.relation_blocks[0].attn.qkv.bias.abs().sum() == 0  # trunc_normal weights, zero biases
    assert 0.015 < vit.relation_blocks[0].mlp.fc1.weight.std() < 0.025


def test_forward_cls_equals_timm_at_native_size():
    torch.manual_seed(0)
    ours = build_backbone("vit_tiny", depth=2, img_size=32).eval()
    timm_vit = _timm_vit("vit_tiny", depth=2, img_size=32).eval()
    plain = {k: v for k, v in ours.state_dict().items() if not k.startswith("relation_blocks.")}
    timm_vit.load_state_dict(plain, strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours.forward_cls(x), timm_vit(x))
    torch.testing.assert_close(ours(x), timm_vit(x))


def test_position_interpolation_is_dinos():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", depth=1)  # native 224: 14 x 14 positions
    assert vit.interpolate_pos_encoding(196) is vit.pos_embed
    pos = vit.interpolate_pos_encoding(36)  # a 96-px crop
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic")  # DINO: w0 + 0.1
    assert pos.shape == (1, 37, 192)
    torch.testing.assert_close(pos[0, 0], vit.pos_embed[0, 0])
    torch.testing.assert_close(pos[0, 1:], expected.permute(0, 2, 3, 1).reshape(36, -1))
    assert vit.forward_features(torch.randn(2, 3, 96, 96)).shape == (2, 37, 192)
    with pytest.raises(ValueError, match="square"):
        vit.interpolate_pos_encoding(12)


class RecordingMemory:
    """Returns fixed neighbours and records the queries it was asked."""

    def __init__(self, neighbours: torch.Tensor):
        self.neighbours, self.queries = neighbours, []

    def retrieve(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        self.queries.append(queries.detach().clone())
        return self.neighbours[: queries.shape[0], :k]


def test_forward_mugs_query_and_relation_output():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", depth=2, img_size=32).eval()
    x = torch.randn(4, 3, 16, 16)  # 1 patch + CLS
    memory = RecordingMemory(torch.randn(4, 5, 192))
    tokens, relation = vit.forward_mugs(x, memory, top_k=3)

    pre_norm = vit.blocks(vit._pos_embed(vit.patch_embed(x)))  # (4, 2, 192)
    query = pre_norm.mean(dim=1)  # all tokens, CLS included, before the final LN
    torch.testing.assert_close(memory.queries[0], query)
    torch.testing.assert_close(tokens, vit.norm(pre_norm))
    seq = torch.cat([query.unsqueeze(1), memory.neighbours[:, :3]], dim=1)  # (4, 4, 192), no positions
    torch.testing.assert_close(relation, vit.norm(vit.relation_blocks[0](seq)[:, 0]))

    _, none = vit.forward_mugs(x, None, top_k=3)
    assert none is None


def test_relation_gradient_reaches_backbone_through_token_zero_only():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", depth=1, img_size=32)
    neighbours = torch.randn(2, 3, 192, requires_grad=True)
    _, relation = vit.forward_mugs(torch.randn(2, 3, 32, 32), RecordingMemory(neighbours), top_k=3)
    # a random projection, not .sum(): the sum of a LayerNorm output is constant, its gradient zero in exact arithmetic
    (relation * torch.randn_like(relation)).sum().backward()
    assert neighbours.grad is not None  # a fake memory's rows would get one; FeatureMemory's are buffers
    assert vit.blocks[0].mlp.fc1.weight.grad.abs().sum() > 1e-3
    assert vit.relation_blocks[0].attn.qkv.weight.grad.abs().sum() > 1e-3


def test_without_relation_block():
    vit = MugsViT(192, 1, 3, img_size=32, num_relation_blocks=0)
    assert not any(k.startswith("relation_blocks") for k in vit.state_dict())
    _, relation = vit.forward_mugs(torch.randn(2, 3, 32, 32), RecordingMemory(torch.randn(2, 3, 192)), top_k=3)
    assert relation is None
    assert math.isqrt(vit.pos_embed.shape[1] - 1) == 2
