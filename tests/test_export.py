"""mugs_fast.export: timm loads the safetensors strictly and gives the teacher's features; the release's .pth."""

import json

import pytest
import timm
import torch
from mugs_testing import small_cfg

from mugs_fast.checkpoint import atomic_save, backbone_from_checkpoint, release_entries
from mugs_fast.config import recipe
from mugs_fast.export import ExportError, export, main, timm_call
from mugs_fast.mugs import Mugs
from mugs_fast.vit import build_backbone


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))


def _checkpoint(tmp_path, cfg):
    """A checkpoint whose teacher differs from its initialisation (and from the student)."""
    torch.manual_seed(0)
    model = Mugs(cfg)
    _perturb(model.teacher)
    path = tmp_path / "checkpoint.pth"
    atomic_save({**release_entries(model), "config": cfg.to_dict(), "step": 7}, path)
    return path, model


def _teacher_only_checkpoint(tmp_path, cfg):
    """The entries export reads (teacher, config) of a teacher backbone with perturbed weights."""
    torch.manual_seed(0)
    backbone = build_backbone(cfg.arch, depth=cfg.depth, img_size=cfg.global_crop_size)
    _perturb(backbone)
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    atomic_save({"teacher": teacher, "config": cfg.to_dict(), "step": 7}, path)
    return path, backbone


# the release's ViT-S at 224 px (the timm call, no extra arguments), and a 2-block ViT-Ti on 48 px
SMALL_HEADS = dict(head_hidden_dim=32, pred_hidden_dim=32, group_out_dim=64, group_bottleneck_dim=16)


@pytest.mark.parametrize(
    "cfg",
    [
        small_cfg(arch="vit_small", depth=0, global_crop_size=224, size_crops=(96,)),
        small_cfg(arch="vit_tiny", depth=2, global_crop_size=48),
    ],
    ids=["vit_small_224", "vit_tiny_depth2_48px"],
)
def test_timm_loads_the_export_strictly_with_the_teachers_features(tmp_path, cfg):
    ckpt, backbone = _teacher_only_checkpoint(tmp_path, cfg)
    info = export(ckpt, tmp_path / "out", verify=False)
    file = tmp_path / "out" / f"{cfg.arch}_backbone.safetensors"
    overlay = dict(file=str(file))
    if cfg.arch == "vit_small":
        timm_model = timm.create_model(
            "vit_small_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
        )
    else:
        timm_model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=48, depth=2, pretrained_cfg_overlay=overlay
        )
    x = torch.randn(2, 3, cfg.global_crop_size, cfg.global_crop_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), backbone.eval().forward_cls(x), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "out" / "export.json").read_text())["timm_call"] == info["timm_call"]


def test_the_release_pth_holds_the_teacher_backbone_with_its_relation_block(tmp_path):
    cfg = small_cfg(**SMALL_HEADS)
    ckpt, model = _checkpoint(tmp_path, cfg)
    export(ckpt, tmp_path / "out")  # with its own check through timm
    state = torch.load(tmp_path / "out" / "vit_tiny_backbone.pth", weights_only=True)
    assert list(state) == ["state_dict"]
    backbone = build_backbone("vit_tiny", depth=cfg.depth, img_size=cfg.global_crop_size)
    backbone.load_state_dict(state["state_dict"])  # strict: every key, relation block included
    for key, value in model.teacher.backbone.state_dict().items():
        assert torch.equal(state["state_dict"][key], value), key


def test_timm_call_of_the_released_recipes_is_the_plain_one(tmp_path):
    name, kwargs = timm_call(recipe("vit_base_400ep"), tmp_path / "f.safetensors")
    assert name == "vit_base_patch16_224" and {k for k in kwargs} == {
        "pretrained",
        "num_classes",
        "pretrained_cfg_overlay",
    }
    assert kwargs["pretrained_cfg_overlay"]["mean"] == (0.485, 0.456, 0.406)


def test_cli(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path, small_cfg(**SMALL_HEADS))
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224'" in out and "depth=2" in out
    (tmp_path / "bad.pth").write_text("no")
    assert main([str(tmp_path / "bad.pth"), "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mugs-export: error:") and err.count("\n") == 1


def test_a_backbone_that_timm_does_not_reproduce_leaves_no_files(tmp_path, monkeypatch, capsys):
    ckpt, _ = _checkpoint(tmp_path, small_cfg(**SMALL_HEADS))
    wrong = backbone_from_checkpoint(torch.load(ckpt, weights_only=True))
    _perturb(wrong)
    monkeypatch.setattr("mugs_fast.export.backbone_from_checkpoint", lambda *args, **kwargs: wrong)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="other features than the checkpoint"):
        export(ckpt, out)
    assert list(out.iterdir()) == []  # neither the files nor their temporaries
    assert main([str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mugs-export: error: timm's vit_tiny_patch16_224") and err.count("\n") == 1


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["ckpt.pth", "--checkpoint_key", "teachers", "--out", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("mugs-export: error:") and err.count("\n") == 1
