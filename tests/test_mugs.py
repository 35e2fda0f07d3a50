import math

import pytest
import torch
from mugs_testing import make_batch, small_cfg

from mugs_fast.config import RECIPES, recipe
from mugs_fast.mugs import LOSS_NAMES, Mugs, train_step
from mugs_fast.optim import build_optimizer, build_schedules
from mugs_fast.vit import ARCHS

RELEASED = [n for n in RECIPES if n != "tiny"]


def spec_keys(arch: str, student: bool) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of a released student / teacher, written out from spec section 9.2."""
    d, depth, _ = ARCHS[arch]
    keys = {
        "backbone.cls_token": (1, 1, d),
        "backbone.pos_embed": (1, 197, d),
        "backbone.patch_embed.proj.weight": (d, 3, 16, 16),
        "backbone.patch_embed.proj.bias": (d,),
        "backbone.norm.weight": (d,),
        "backbone.norm.bias": (d,),
    }
    block = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (4 * d, d),
        "mlp.fc1.bias": (4 * d,),
        "mlp.fc2.weight": (d, 4 * d),
        "mlp.fc2.bias": (d,),
    }
    for prefix in [f"backbone.blocks.{i}." for i in range(depth)] + ["backbone.relation_blocks.0."]:
        keys.update({prefix + k: v for k, v in block.items()})
    for head in ("instance_head", "local_group_head"):
        keys.update({f"{head}.projector.0.weight": (2048, d), f"{head}.projector.2.weight": (2048, 2048)})
        keys[f"{head}.projector.4.weight"] = (256, 2048)
        if student:
            keys.update({f"{head}.predictor.0.weight": (4096, 256), f"{head}.predictor.2.weight": (256, 4096)})
    for i, (o, n) in enumerate([(2048, d), (2048, 2048), (256, 2048)]):
        keys.update({f"group_head.projector.{2 * i}.weight": (o, n), f"group_head.projector.{2 * i}.bias": (o,)})
    keys.update({"group_head.last_layer.weight_g": (65536, 1), "group_head.last_layer.weight_v": (65536, 256)})
    return keys


@pytest.mark.parametrize("name", RELEASED)
def test_state_dict_keys_and_shapes_match_the_release(name):
    with torch.device("meta"):
        model = Mugs(recipe(name))
    for net, student in ((model.student, True), (model.teacher, False)):
        ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert ours == spec_keys(recipe(name).arch, student)


def test_vit_small_head_parameter_counts():
    with torch.device("meta"):
        model = Mugs(recipe("vit_small_100ep"))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(model.student.instance_head) == count(model.student.local_group_head) == 7_602_176
    assert count(model.teacher.instance_head) == 5_505_024
    assert count(model.student.group_head) == 22_352_128


def test_teacher_starts_as_student_and_is_frozen():
    torch.manual_seed(0)
    model = Mugs(small_cfg())
    student = model.student.state_dict()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, student[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(
        b.drop_prob == 0 for b in [blk.drop_path1 for blk in model.teacher.backbone.blocks] if hasattr(b, "drop_prob")
    )


def test_forward_outputs_are_crop_major():
    torch.manual_seed(0)
    cfg = small_cfg(drop_path_rate=0.0)
    model, batch = Mugs(cfg), make_batch(cfg)
    b, c = cfg.batch_size_per_gpu, 2 + cfg.local_crops_number
    t = model.forward_teacher(batch["teacher"])
    s = model.forward_student(batch["student_global"], batch["student_local"])
    assert t["instance"].shape == (2 * b, 24) and s["instance"].shape == (c * b, 24)
    assert t["local_group"].shape == (2 * b, 20) and s["local_group"].shape == (c * b, 20)
    assert t["group"].shape == (2 * b, 56) and s["group"].shape == (c * b, 56)
    assert t["mean_patch"].shape == s["mean_patch"].shape == (2 * b, 192)
    assert not t["instance"].requires_grad and s["instance"].requires_grad and not s["mean_patch"].requires_grad
    # row j*B + n of the student output is crop j of image n: a crop's rows do not depend on the other crops
    alone = model.forward_student(batch["student_global"][:b], None)
    torch.testing.assert_close(alone["group"], s["group"][:b])


@pytest.mark.parametrize("weights", [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 0.0, 2.0)])
def test_switched_off_supervisions_are_not_built(weights):
    torch.manual_seed(0)
    cfg = small_cfg(loss_weights=weights)
    model = Mugs(cfg)
    inst, lg, group = (w > 0 for w in weights)
    assert (model.student.instance_head is not None, model.instance_queue is not None) == (inst, inst)
    assert (model.student.local_group_head is not None, model.student_memory is not None) == (lg, lg)
    assert (len(model.student.backbone.relation_blocks) > 0, model.local_group_queue is not None) == (lg, lg)
    assert (model.student.group_head is not None, model.group_loss is not None) == (group, group)
    opt = build_optimizer(cfg, model.student)
    out = train_step(model, opt, build_schedules(cfg, 3), make_batch(cfg), 0)
    assert {k for k in out if k in LOSS_NAMES} == {n for n, w in zip(LOSS_NAMES, weights, strict=True) if w > 0}
    assert torch.isfinite(out["loss"])


def test_total_is_weighted_mean():
    torch.manual_seed(0)
    cfg = small_cfg(loss_weights=(1.0, 2.0, 0.5))
    model, batch = Mugs(cfg), make_batch(cfg)
    t = model.forward_teacher(batch["teacher"])
    s = model.forward_student(batch["student_global"], batch["student_local"])
    losses = model.losses(s, t, 0.04)
    expected = (losses["instance-sup."] + 2 * losses["local-group-sup."] + 0.5 * losses["group-sup."]) / 3.5
    torch.testing.assert_close(losses["loss"], expected)


def _grad_footprint(model, loss):
    model.student.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in model.student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_exactly_what_the_spec_says():
    torch.manual_seed(0)
    cfg = small_cfg(norm_last_layer=False)
    model, batch = Mugs(cfg), make_batch(cfg)
    t = model.forward_teacher(batch["teacher"])
    s = model.forward_student(batch["student_global"], batch["student_local"])
    losses = model.losses(s, t, 0.04)
    names = {n for n, _ in model.student.named_parameters()}

    def part(*prefixes):
        return {n for n in names if n.startswith(prefixes)}

    backbone, relation = part("backbone."), part("backbone.relation_blocks.")
    # instance and group losses: the CLS token path (all of the backbone but the relation block) and their head
    assert _grad_footprint(model, losses["instance-sup."]) == (backbone - relation) | part("instance_head.")
    assert _grad_footprint(model, losses["group-sup."]) == (backbone - relation) | part("group_head.")
    # local-group loss: the relation block, the backbone through token 0 (the pre-norm mean), the final norm
    # and its head
    assert _grad_footprint(model, losses["local-group-sup."]) == backbone | part("local_group_head.")
    # never the teacher, the memories, the queues or the centre
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(b.requires_grad for b in model.buffers())


def test_buffer_writes_of_a_step():
    torch.manual_seed(0)
    cfg = small_cfg(drop_path_rate=0.0, warmup_epochs=0)
    model, batch = Mugs(cfg), make_batch(cfg)
    b = cfg.batch_size_per_gpu
    t = model.forward_teacher(batch["teacher"])  # what the step will compute, before any update
    s = model.forward_student(batch["student_global"], batch["student_local"])
    train_step(model, build_optimizer(cfg, model.student), build_schedules(cfg, 3), batch, 0)

    torch.testing.assert_close(model.instance_queue.queue[: 2 * b], t["instance"])  # view 0 rows, then view 1
    torch.testing.assert_close(model.local_group_queue.queue[: 2 * b], t["local_group"])
    assert int(model.instance_queue.ptr) == int(model.local_group_queue.ptr) == 2 * b
    torch.testing.assert_close(model.group_loss.center, 0.1 * t["group"].mean(0, keepdim=True))
    torch.testing.assert_close(model.teacher_memory.features[:b], t["mean_patch"][:b])  # teacher crop 0, all
    assert int(model.teacher_memory.ptr) == b
    weak = batch["weak"]
    n_weak = int(weak.sum())
    assert 0 < n_weak < b
    torch.testing.assert_close(model.student_memory.features[:n_weak], s["mean_patch"][:b][weak])  # weak only
    assert int(model.student_memory.ptr) == n_weak


def test_info_nce_is_near_log_queue_size_at_init():
    # random unit vectors of width E give logits of std 1 / (tau sqrt(E)): near 0 at the release's E = 256
    torch.manual_seed(0)
    cfg = small_cfg(instance_out_dim=256, local_group_out_dim=256)
    model, batch = Mugs(cfg), make_batch(cfg)
    t = model.forward_teacher(batch["teacher"])
    s = model.forward_student(batch["student_global"], batch["student_local"])
    losses = model.losses(s, t, 0.04)
    assert losses["instance-sup."].item() == pytest.approx(math.log(cfg.instance_queue_size + 1), abs=0.3)
    assert losses["local-group-sup."].item() == pytest.approx(math.log(cfg.local_group_queue_size + 1), abs=0.3)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    cfg = small_cfg(warmup_epochs=0, lr=0.1, drop_path_rate=0.0, freeze_last_layer=0)
    model, batch = Mugs(cfg), make_batch(cfg)
    opt, sched = build_optimizer(cfg, model.student), build_schedules(cfg, 10)
    losses = [train_step(model, opt, sched, batch, step)["loss"].item() for step in range(8)]
    assert losses[-1] < losses[0] - 0.2, losses


def test_last_layer_freeze_and_ema_in_train_step():
    torch.manual_seed(0)
    cfg = small_cfg(warmup_epochs=0, norm_last_layer=False, freeze_last_layer=1)
    model = Mugs(cfg)
    opt, sched = build_optimizer(cfg, model.student), build_schedules(cfg, 2)  # steps 0, 1: epoch 0 (frozen)
    last = model.student.group_head.last_layer
    for step in range(3):
        v_before, fc_before = last.weight_v.clone(), model.student.backbone.blocks[0].mlp.fc1.weight.clone()
        teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
        out = train_step(model, opt, sched, make_batch(cfg, seed=step), step)
        assert torch.equal(last.weight_v, v_before) == (step < 2)
        assert not torch.equal(model.student.backbone.blocks[0].mlp.fc1.weight, fc_before)
        m = sched.momentum[step]
        assert out["momentum"] == m
        student = model.student.state_dict()
        for k, v in model.teacher.state_dict().items():
            torch.testing.assert_close(v, m * teacher_before[k] + (1 - m) * student[k])


def test_nonfinite_losses_are_reported_without_sync_in_the_step():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = Mugs(cfg)
    opt, sched = build_optimizer(cfg, model.student), build_schedules(cfg, 3)
    train_step(model, opt, sched, make_batch(cfg), 0)
    assert model.nonfinite_report() is None
    bad = make_batch(cfg, seed=1)
    bad["teacher"][0, 0, 0, 0] = float("nan")
    train_step(model, opt, sched, bad, 1)
    train_step(model, opt, sched, make_batch(cfg), 2)
    report = model.nonfinite_report()
    assert report.startswith("non-finite loss at step 1:") and "group-sup." in report and "loss" in report


@pytest.mark.gpu
def test_train_step_never_syncs_on_gpu():
    torch.manual_seed(0)
    cfg = small_cfg(precision="bf16")
    model = Mugs(cfg).cuda()
    opt, sched = build_optimizer(cfg, model.student), build_schedules(cfg, 3)
    batches = [{k: v.cuda() for k, v in make_batch(cfg, seed=i).items()} for i in range(3)]
    train_step(model, opt, sched, batches[0], 0)  # warm-up: lazy allocations, shadow build
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [train_step(model, opt, sched, batches[i], i) for i in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(o["loss"]) for o in outs)
    assert model.student_memory.shadow().dtype == torch.bfloat16
