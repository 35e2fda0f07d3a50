import torch
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from mugs_fast.heads import GroupHead, ProjectionHead, WeightNormLinear


def test_projection_head_keys_and_outputs():
    torch.manual_seed(0)
    student = ProjectionHead(19, 11, hidden_dim=23, pred_hidden_dim=29)
    teacher = ProjectionHead(19, 11, hidden_dim=23)
    assert {k: tuple(v.shape) for k, v in student.state_dict().items()} == {
        "projector.0.weight": (23, 19),
        "projector.2.weight": (23, 23),
        "projector.4.weight": (11, 23),
        "predictor.0.weight": (29, 11),
        "predictor.2.weight": (11, 29),
    }
    assert set(teacher.state_dict()) == {"projector.0.weight", "projector.2.weight", "projector.4.weight"}

    x = torch.randn(7, 19)
    torch.testing.assert_close(teacher(x), F.normalize(teacher.projector(x), dim=-1))
    z = F.normalize(student.projector(x), dim=-1)
    torch.testing.assert_close(student(x), F.normalize(student.predictor(z), dim=-1))
    student.norm_before_pred = False
    torch.testing.assert_close(student(x), F.normalize(student.predictor(student.projector(x)), dim=-1))


def test_projection_head_init_and_bn_keys():
    torch.manual_seed(0)
    head = ProjectionHead(384, 256, hidden_dim=2048, pred_hidden_dim=4096)
    assert 0.019 < head.projector[0].weight.std() < 0.021  # trunc_normal(0.02)
    w = head.predictor[0].weight  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= 1 / 256**0.5 and w.std() > 0.03
    bn = ProjectionHead(8, 4, hidden_dim=6, use_bn=True)
    assert [k for k in bn.state_dict() if k.endswith("weight")] == [
        "projector.0.weight",
        "projector.1.weight",
        "projector.3.weight",
        "projector.4.weight",
        "projector.6.weight",
    ]


def test_weight_norm_linear_matches_torch_weight_norm():
    torch.manual_seed(0)
    ours = WeightNormLinear(13, 17)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    ref = parametrizations.weight_norm(torch.nn.Linear(13, 17, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(5, 13)
    torch.testing.assert_close(ours(x), ref(x))
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(ours.weight_g.grad, ref.parametrizations.weight.original0.grad)
    torch.testing.assert_close(ours.weight_v.grad, ref.parametrizations.weight.original1.grad)


def test_group_head():
    torch.manual_seed(0)
    head = GroupHead(19, 37, hidden_dim=23, bottleneck_dim=7, norm_last_layer=True)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "projector.0.weight": (23, 19),
        "projector.0.bias": (23,),
        "projector.2.weight": (23, 23),
        "projector.2.bias": (23,),
        "projector.4.weight": (7, 23),
        "projector.4.bias": (7,),
        "last_layer.weight_g": (37, 1),
        "last_layer.weight_v": (37, 7),
    }
    assert not head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    assert GroupHead(19, 37, 23, 7, norm_last_layer=False).last_layer.weight_g.requires_grad
    x = torch.randn(4, 19)
    z = F.normalize(head.projector(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head(x), z @ F.normalize(v, dim=1).T)


def test_group_head_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = GroupHead(24, out_dim=37, hidden_dim=32, bottleneck_dim=16)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        z = F.normalize(head.projector(x), dim=-1).float()  # the bf16 bottleneck the prototypes see
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head.last_layer(z), rtol=0, atol=0)
