"""mugs_fast.engine: the full loop on a tiny .beton, exact resumption, non-finite losses, run-directory checks."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _fixtures import write_beton
from mugs_testing import small_cfg

from mugs_fast import engine
from mugs_fast.checkpoint import load_checkpoint
from mugs_fast.data.beton import sidecar_path
from mugs_fast.engine import TrainError, train

STEPS_PER_EPOCH = 7  # 37 images, batch 5


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return write_beton(tmp_path_factory.mktemp("engine") / "train.beton", 37, seed=4)


def _cfg(beton, out, **overrides):
    base = dict(data_path=str(beton), output_dir=str(out), num_workers=1, log_freq=2, checkpoint_minutes=0)
    return small_cfg(**{**base, **overrides})


def test_a_few_steps_write_metrics_config_and_checkpoint(beton, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(beton, out, max_steps=3))
    assert (result.step, result.total_steps, result.stopped_by) == (3, 3, "max_steps")

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3]
    keys = {"loss", "instance-sup.", "local-group-sup.", "group-sup.", "lr", "wd", "momentum", "teacher_temp"}
    assert keys | {"images_per_s", "data_wait", "replaced_samples"} <= set(records[0])
    assert records[0]["replaced_samples"] == 0
    assert all(0 < r["loss"] < 20 and 0 <= r["data_wait"] <= 1 for r in records)

    assert json.loads((out / "config.json").read_text())["data_path"] == str(beton)
    assert {"commit", "dirty", "package"} <= set(json.loads((out / "run.json").read_text())["version"])
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 3 and ckpt["epoch"] == 0 and ckpt["loader"]["sampler"]["position"] == 3
    expected = {"student", "teacher", "student_mem", "teacher_mem", "instance-sup.", "local-group-sup.", "group-sup."}
    assert expected | {"optimizer", "rng", "config", "version"} <= set(ckpt)
    assert all(k.startswith("module.") for k in ckpt["student"]) and "backbone.cls_token" in ckpt["teacher"]
    assert not list(out.glob(".*tmp*"))


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(beton, tmp_path):
    # drop path on: the resumed run must also restore the RNG; 9 steps cross the epoch boundary at 7
    overrides = dict(drop_path_rate=0.2, epochs=3)
    train(_cfg(beton, tmp_path / "a", max_steps=5, **overrides))
    resumed = train(_cfg(beton, tmp_path / "a", max_steps=9, **overrides))
    straight = train(_cfg(beton, tmp_path / "b", max_steps=9, **overrides))
    assert resumed.step == straight.step == 9
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pth"), load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    for entry in ("teacher", "student", "teacher_mem", "instance-sup.", "group-sup."):
        for key, value in b[entry].items():
            assert torch.equal(a[entry][key], value), (entry, key)
    assert (tmp_path / "a" / "checkpoint0000.pth").exists()  # saveckp_freq: epoch 0 is numbered, as the release
    logged = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 5, 6, 8, 9]  # log_freq 2, plus the last step of each command

    again = train(_cfg(beton, tmp_path / "a", max_steps=9, **overrides))
    assert again.step == 9 and again.stopped_by == "max_steps"  # nothing left to do


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(beton, tmp_path, monkeypatch):
    real_step = engine.train_step

    def poisoned(model, optimizer, schedules, batch, step):
        if step == 9:
            batch = {**batch, "student_local": batch["student_local"] * float("nan")}
        return real_step(model, optimizer, schedules, batch, step)

    monkeypatch.setattr(engine, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"non-finite loss at step 9: .*loss.*last good checkpoint is kept"):
        train(_cfg(beton, out, max_steps=12, log_freq=4))
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == STEPS_PER_EPOCH  # the epoch-end checkpoint, written before the poisoned step
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())


def test_resuming_with_other_settings_is_refused(beton, tmp_path):
    train(_cfg(beton, tmp_path / "run", max_steps=1))
    with pytest.raises(TrainError, match=r"other settings \(lr: 0.1 \(was"):
        train(_cfg(beton, tmp_path / "run", max_steps=2, lr=0.1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(data_path=""), "either --data_path"),
        (dict(data_path="missing.beton"), "no such file"),
        (dict(synthetic=True), "either --data_path"),
        (dict(batch_size_per_gpu=50), "no full batch"),
        (dict(instance_queue_size=7), r"--instance_queue_size 7 is smaller than the \d+ teacher rows"),
    ],
)
def test_bad_inputs_are_train_errors(beton, tmp_path, overrides, message):
    with pytest.raises(TrainError, match=message):
        train(_cfg(beton, tmp_path / "run", **overrides))


def test_head_batchnorm_under_ddp_needs_gpus():
    cfg = small_cfg(use_bn_in_head=True)
    model = engine.Mugs(cfg)
    rt = engine.Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(TrainError, match="SyncBatchNorm"):
        engine._prepare(model, cfg, rt)


def test_a_run_directory_is_refused_while_a_live_process_holds_it(beton, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    hold = "import sys, time; from mugs_fast.runtime import RunLock; lock = RunLock(sys.argv[1]); lock.acquire()"
    hold += "; print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(TrainError, match=rf"--output_dir {out} is in use by another run \(pid {holder.pid} on "):
            train(_cfg(beton, out, max_steps=1))
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    assert train(_cfg(beton, out, max_steps=1)).step == 1  # a dead holder holds nothing


def test_resume_survives_a_damaged_metrics_tail(beton, tmp_path):
    out = tmp_path / "run"
    train(_cfg(beton, out, max_steps=3))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 0, "lo')  # a node crash mid-write
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: dropped 1 damaged line\(s\) \(the last line"):
        train(_cfg(beton, out, max_steps=4))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3, 4]


class _EvaluationFailed(Exception):
    pass


def test_the_epoch_end_checkpoint_is_written_before_the_evaluation(beton, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise _EvaluationFailed

    monkeypatch.setattr(engine, "evaluate_knn", failing)
    out = tmp_path / "run"
    with pytest.raises(_EvaluationFailed):
        train(_cfg(beton, out, val_path=str(beton), knn_freq=1, max_steps=STEPS_PER_EPOCH + 2))
    assert load_checkpoint(out / "checkpoint.pth")["step"] == STEPS_PER_EPOCH  # the epoch's work is kept


def _with_classes(path, classes, directory):
    """A copy of the .beton `path` in `directory` with the class list `classes` beside it."""
    copy = shutil.copy(path, directory / path.name)
    sidecar_path(copy, "classes").write_text(json.dumps(classes))
    return copy


@pytest.mark.parametrize("problem", ["not_a_beton", "empty", "other_classes", "labels_beyond_train"])
def test_a_bad_val_set_is_refused_before_anything_is_done(beton, tmp_path, problem):
    train_path = beton
    if problem == "not_a_beton":
        val = tmp_path / "val.beton"
        val.write_bytes(b"not a beton file" * 100)
        message = r"--val_path .*val.beton: not"
    elif problem == "empty":
        val = write_beton(tmp_path / "val.beton", 0)
        message = r"--val_path .*: holds no samples"
    elif problem == "other_classes":
        for split in ("train", "val"):
            (tmp_path / split).mkdir()
        train_path = _with_classes(beton, ["a", "b", "c", "d", "e"], tmp_path / "train")
        val = _with_classes(write_beton(tmp_path / "val.beton", 11), ["a", "b", "x", "d", "e"], tmp_path / "val")
        message = r"class list .* differs from the training set's .*: label 2 is 'x' in val, 'c' in train"
    else:
        val = write_beton(tmp_path / "val.beton", 11, num_classes=7)
        message = r"labels up to 6, but the training set train.beton has 5 classes"
    with pytest.raises(TrainError, match=message):
        train(_cfg(train_path, tmp_path / "run", val_path=str(val), max_steps=1))
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_refused_from_the_library_too(beton, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(TrainError, match=r"--output_dir .*run: is not a directory"):
        train(_cfg(beton, tmp_path / "run", max_steps=1))
    assert (tmp_path / "run").read_text() == "not a directory"


def test_a_run_with_a_val_set_writes_its_learning_curves(beton, tmp_path):
    train(_cfg(beton, tmp_path / "plain", max_steps=2))
    assert not (tmp_path / "plain" / "learning_curves.png").exists()
    train(_cfg(beton, tmp_path / "val", val_path=str(beton), knn_freq=1, max_steps=STEPS_PER_EPOCH))
    assert (tmp_path / "val" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_linear_eval_adds_the_fast_probe_after_the_last_epoch_beside_knn(beton, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(beton, out, val_path=str(beton), knn_freq=0, epochs=1, linear_eval=True)
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn, linear = ([r for r in records if name in r] for name in ("knn", "linear"))
    assert len(knn) == len(linear) == 1 and linear[0]["step"] == knn[0]["step"] == STEPS_PER_EPOCH
    probe = linear[0]["linear"]
    assert probe["mode"] == "cached" and len(probe["grid"]) == 20 and probe["val_samples"] == 37
    assert 0 <= probe["best"]["top1"] <= probe["best"]["top5"] <= 100
