import numpy as np
import pytest
import torch
from mugs_testing import small_cfg

from mugs_fast.config import recipe
from mugs_fast.mugs import Mugs, MugsNetwork
from mugs_fast.optim import (
    LARS,
    apply_schedules,
    build_optimizer,
    build_schedules,
    cancel_last_layer_gradients,
    clip_gradients,
    clip_threshold,
    cosine_schedule,
    ema_update,
    param_groups,
)


def test_param_groups_of_vit_small_student():
    with torch.device("meta"):
        student = MugsNetwork(recipe("vit_small_100ep"), student=True)  # norm_last_layer false: weight_g trains
    groups = param_groups(student)
    assert [g["name"] for g in groups] == ["normal_params", "patch_embed", "no_wd", "patch_embed_no_wd"]
    assert [len(g["params"]) for g in groups] == [69, 1, 109, 1]  # as counted on the release (spec 6.1)
    assert groups[1]["params"][0] is student.backbone.patch_embed.proj.weight
    assert groups[3]["params"][0] is student.backbone.patch_embed.proj.bias
    regularised = {id(p) for p in groups[0]["params"]}
    assert id(student.backbone.cls_token) in regularised and id(student.backbone.pos_embed) in regularised
    assert [g.get("weight_decay") for g in groups[2:]] == [0.0, 0.0]


@pytest.mark.parametrize(
    "name, world, peak",
    [("vit_small_100ep", 8, 0.0016), ("vit_base_400ep", 24, 0.00315), ("vit_large_250ep", 40, 0.00375)],
)
def test_schedules_start_warmup_end(name, world, peak):
    cfg = recipe(name)
    it = 7  # iterations per epoch
    s = build_schedules(cfg, it, world_size=world)
    warm = cfg.warmup_epochs * it
    assert len(s) == cfg.epochs * it
    assert s.lr[0] == 0.0
    assert s.lr[warm - 1] == pytest.approx(peak) and s.lr[warm] == pytest.approx(peak)
    assert cfg.min_lr < s.lr[-1] < cfg.min_lr + 1e-3 * (peak - cfg.min_lr)  # cosine ends just above min_lr
    assert s.wd[0] == pytest.approx(cfg.weight_decay) and s.wd[-1] == pytest.approx(cfg.weight_decay_end, rel=1e-4)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0, abs=1e-7)
    assert np.all(np.diff(s.momentum) >= 0)


def test_teacher_temperature_is_per_epoch():
    cfg = recipe("vit_small_300ep")  # 0.04 -> 0.07 over 30 epochs
    s = build_schedules(cfg, 5)
    assert s.teacher_temp[0] == s.teacher_temp[4] == pytest.approx(0.04)
    assert s.teacher_temp[5] == pytest.approx(0.04 + 0.03 / 29)  # steps of an epoch share its value
    assert s.teacher_temp[29 * 5] == pytest.approx(0.07) and s.teacher_temp[-1] == pytest.approx(0.07)
    assert np.all(build_schedules(recipe("vit_small_100ep"), 3).teacher_temp == 0.04)


def test_cosine_schedule_formula():
    v = cosine_schedule(1.0, 0.0, epochs=3, iters_per_epoch=2, warmup_epochs=1)
    n = 4
    expected = [0.0, 1.0] + [0.5 * (1 + np.cos(np.pi * i / n)) for i in range(n)]
    np.testing.assert_allclose(v, expected)


def test_apply_schedules_sets_groups():
    torch.manual_seed(0)
    student = MugsNetwork(small_cfg(), student=True)
    opt = build_optimizer(small_cfg(), student)
    s = build_schedules(small_cfg(), 10)
    lr, wd = apply_schedules(opt, s, 13, patch_embed_lr_mult=0.2)
    assert lr == s.lr[13] and wd == s.wd[13]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["normal_params"]["lr"] == lr and by_name["no_wd"]["lr"] == lr
    assert by_name["patch_embed"]["lr"] == pytest.approx(0.2 * lr) and by_name["patch_embed_no_wd"][
        "lr"
    ] == pytest.approx(0.2 * lr)
    assert by_name["normal_params"]["weight_decay"] == wd and by_name["patch_embed"]["weight_decay"] == wd
    assert by_name["no_wd"]["weight_decay"] == 0.0 and by_name["patch_embed_no_wd"]["weight_decay"] == 0.0


def test_per_tensor_clipping():
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 3
    b.grad = torch.tensor([1.0, 0.0, 0.0])  # norm 1 -> untouched
    norms = clip_gradients([a, b, c], 3.0)  # c has no grad
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * 3.0 / (5.0 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))
    assert c.grad is None
    assert clip_threshold(recipe("vit_large_250ep"), 100) == 3.0
    assert clip_threshold(recipe("vit_large_250ep"), 101) == pytest.approx(0.3)
    assert clip_threshold(recipe("vit_base_400ep"), 300) == 3.0


def test_cancel_last_layer_gradients():
    student = MugsNetwork(small_cfg(norm_last_layer=False), student=True)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(student)
    named = dict(student.named_parameters())
    assert named["group_head.last_layer.weight_v"].grad is None and named["group_head.last_layer.weight_g"].grad is None
    assert all(p.grad is not None for n, p in named.items() if "last_layer" not in n)


def test_ema_over_shared_parameters():
    torch.manual_seed(0)
    model = Mugs(small_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = dict(model.student.named_parameters())
    ema_update(*model.ema_pairs(), momentum=0.9)
    for name, t in model.teacher.named_parameters():
        torch.testing.assert_close(t, 0.9 * teacher_before[name] + 0.1 * student[name])
    names = {n for n, _ in model.teacher.named_parameters()}
    assert "backbone.relation_blocks.0.attn.qkv.weight" in names and "local_group_head.projector.4.weight" in names
    assert not any(".predictor." in n for n in names)  # the student predictors have no teacher copy


def test_lars_and_sgd_step():
    for name in ("sgd", "lars"):
        torch.manual_seed(0)
        student = MugsNetwork(small_cfg(optimizer=name), student=True)
        opt = build_optimizer(small_cfg(optimizer=name), student)
        assert isinstance(opt, LARS) == (name == "lars")
        apply_schedules(opt, build_schedules(small_cfg(), 10), 12, 0.2)
        before = student.backbone.blocks[0].mlp.fc1.weight.clone()
        for p in student.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert not torch.equal(before, student.backbone.blocks[0].mlp.fc1.weight)
