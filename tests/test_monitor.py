"""mugs_fast.monitor: the collapse signals on hand-made embeddings and logits, the hooks, the logged values and
the one-time warning in a training run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _fixtures import write_beton
from mugs_testing import make_batch, small_cfg

from mugs_fast import engine
from mugs_fast.engine import train
from mugs_fast.metrics import MetricLogger
from mugs_fast.monitor import (
    SIGNALS,
    CollapseMonitor,
    assignment_entropies,
    collapse_scales,
    collapsed_signals,
    embedding_std,
    group_agreement,
)
from mugs_fast.mugs import Mugs


def _sphere(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_embedding_std_is_zero_when_collapsed_and_one_over_sqrt_dim_when_uniform():
    dim = 48
    collapsed = _sphere(1, dim).expand(100, dim)
    assert embedding_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_std(_sphere(20000, dim)).item() == pytest.approx(1 / math.sqrt(dim), rel=0.02)


def test_embedding_std_of_a_few_tight_clusters_is_that_of_their_centres():
    centres = _sphere(3, 48, seed=1)
    rows = centres.repeat_interleave(50, dim=0)  # (150, 48): 3 clusters of 50 identical rows
    noisy = F.normalize(rows + 1e-4 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(2)), dim=1)
    assert embedding_std(noisy).item() == pytest.approx(rows.std(dim=0).mean().item(), rel=1e-2)
    assert 0 < embedding_std(noisy) < 1 / math.sqrt(48) * 1.2


def test_assignment_entropies_of_one_prototype_a_few_clusters_and_flat_rows():
    rows, k = 60, 37
    one = torch.zeros(rows, k)
    one[:, 5] = 10.0  # every row sharp on prototype 5
    mean, row = assignment_entropies(one, temperature=0.04)
    assert mean.item() == pytest.approx(0.0, abs=1e-4) and row.item() == pytest.approx(0.0, abs=1e-4)

    clusters = torch.zeros(rows, k)
    clusters[torch.arange(rows), torch.arange(rows) % 3] = 10.0  # 3 equal clusters, sharp rows
    mean, row = assignment_entropies(clusters, temperature=0.04)
    assert mean.item() == pytest.approx(math.log(3), abs=1e-4) and row.item() == pytest.approx(0.0, abs=1e-4)

    mean, row = assignment_entropies(torch.zeros(rows, k), temperature=0.04)  # flat rows
    assert mean.item() == pytest.approx(math.log(k)) and row.item() == pytest.approx(math.log(k))


def test_group_agreement_compares_each_teacher_view_with_the_other_student_crops():
    batch, k, crops = 7, 11, 5
    labels = torch.arange(batch) % k
    same = F.one_hot(labels, k).float()  # (B, K): every crop of image b on prototype b
    assert group_agreement(same.repeat(crops, 1), same.repeat(2, 1)).item() == 1.0

    hot = lambda shift: F.one_hot((labels + shift) % k, k).float()  # noqa: E731 - (B, K)
    teacher = torch.cat([hot(0), hot(2)])  # the two teacher views in different groups
    student = torch.cat([hot(0), hot(2), hot(1).repeat(crops - 2, 1)])  # each global crop agrees with its own view
    assert group_agreement(student, teacher).item() == 0.0  # ... a pair the loss does not compare
    student[2 * batch :] = hot(0).repeat(crops - 2, 1)  # the local crops agree with view 0: 3 of the 2 x 4 pairs
    assert group_agreement(student, teacher).item() == pytest.approx(3 / 8)


def test_collapsed_signals_uses_each_threshold_in_its_direction():
    scales = collapse_scales(embed_dim=64, num_prototypes=512, rows=64)
    expected = {"embedding_std": 1 / 8, "group_entropy": math.log(64), "group_row_entropy": math.log(512)}
    assert scales == pytest.approx(expected)
    healthy = {"embedding_std": 0.09, "group_entropy": 3.0, "group_row_entropy": 0.5, "group_agreement": 0.4}
    assert collapsed_signals(healthy, scales) == {}
    collapsed = {**healthy, "embedding_std": 0.01, "group_entropy": 0.1, "group_row_entropy": 6.0}
    assert set(collapsed_signals(collapsed, scales)) == {"embedding_std", "group_entropy", "group_row_entropy"}
    assert collapsed_signals({"step": 3}, scales) == {}  # a run without the signals (e.g. no group head)


def test_the_monitor_measures_only_the_armed_step():
    cfg = small_cfg()
    model, batch = Mugs(cfg), make_batch(cfg)
    monitor = CollapseMonitor(model)

    def forward():
        with torch.no_grad():
            t = model.forward_teacher(batch["teacher"])
            s = model.forward_student(batch["student_global"], batch["student_local"])
        return s, t

    forward()
    assert monitor.take() == {}  # not armed: nothing measured
    monitor.arm(teacher_temp=0.04)
    s, t = forward()
    values = monitor.take()
    assert set(values) == set(SIGNALS) and all(v.dim() == 0 for v in values.values())
    torch.testing.assert_close(values["embedding_std"], embedding_std(t["instance"]))
    torch.testing.assert_close(values["group_row_entropy"], assignment_entropies(t["group"], 0.04)[1])  # centre 0
    assert monitor.take() == {}  # handed over once
    forward()
    assert monitor.take() == {}  # disarmed after one step
    monitor.remove()


def test_the_logger_writes_the_snapshot_with_the_interval_means(tmp_path, capsys):
    logger = MetricLogger(
        tmp_path, total_steps=2, start_step=0, global_batch=1, log_freq=2, device=torch.device("cpu"), enabled=True
    )
    for _ in range(2):
        logger.step({"loss": torch.tensor(1.0), "lr": 0.1, "wd": 0.0, "momentum": 0.9, "teacher_temp": 0.04}, 0.0)
    snapshot = {"embedding_std": torch.tensor(0.125), "group_agreement": torch.tensor(0.5)}
    record = logger.log(1, epoch=0, snapshot=snapshot)
    logger.close()
    assert record["embedding_std"] == 0.125 and record["group_agreement"] == 0.5 and record["loss"] == 1.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["embedding_std"] == 0.125
    assert "emb-std 0.125 agreement 0.5" in capsys.readouterr().out


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return write_beton(tmp_path_factory.mktemp("monitor") / "train.beton", 37, seed=4)


def _run(beton, out, **overrides):
    base = dict(data_path=str(beton), output_dir=str(out), num_workers=1, log_freq=2, checkpoint_minutes=0)
    return train(small_cfg(**{**base, **overrides}))


def test_a_healthy_run_logs_the_signals_and_does_not_warn(beton, tmp_path, capsys):
    _run(beton, tmp_path / "run", max_steps=5)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5] and all(set(SIGNALS) <= set(r) for r in records)
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "emb-std" in captured.out


def test_a_forced_collapse_warns_once(beton, tmp_path, capsys, monkeypatch):
    real_build = engine.build_model

    def collapsed(cfg, device):
        """Both networks' final LayerNorm zeroed: every image has the same features; the teacher stays so."""
        model = real_build(cfg, device)
        for network in (model.student, model.teacher):
            torch.nn.init.zeros_(network.backbone.norm.weight)
            torch.nn.init.zeros_(network.backbone.norm.bias)
        return model

    monkeypatch.setattr(engine, "build_model", collapsed)
    _run(beton, tmp_path / "run", max_steps=6, momentum_teacher=1.0)
    err = capsys.readouterr().err
    assert err.count("warning: the run is collapsing") == 1 and "at step 2:" in err
    assert "teacher embedding std 0 = 0.00 x" in err and "entropy of each teacher row's group assignment" in err
