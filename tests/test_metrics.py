"""mugs_fast.metrics: interval averages, metrics.jsonl, the console line, the code version."""

import json

import pytest
import torch

from mugs_fast.metrics import MetricLogger, code_version, format_record, knn_per_epoch, plot_learning_curves


def _metrics(loss: float) -> dict:
    return {
        "loss": torch.tensor(loss),
        "instance-sup.": torch.tensor(2 * loss),
        "weak_ratio": torch.tensor(0.5),
        "lr": 1e-3,
        "wd": 0.04,
        "momentum": 0.996,
        "teacher_temp": 0.04,
    }


def test_log_averages_the_interval_and_writes_a_json_line(tmp_path, capsys):
    logger = MetricLogger(
        tmp_path, total_steps=7, start_step=0, global_batch=3, log_freq=3, device=torch.device("cpu"), enabled=True
    )
    for step, loss in enumerate([1.0, 2.0, 6.0]):
        logger.step(_metrics(loss), data_seconds=0.0)
        assert logger.due(step) == (step == 2)
    record = logger.log(2, epoch=0)
    logger.step(_metrics(10.0), data_seconds=0.0)
    second = logger.log(3, epoch=1, replaced_samples=2)
    logger.close()
    assert record["loss"] == 3.0 and record["instance-sup."] == 6.0 and record["step"] == 3 and record["lr"] == 1e-3
    assert second["loss"] == 10.0 and second["epoch"] == 1
    assert (record["replaced_samples"], second["replaced_samples"]) == (0, 2)
    assert record["images_per_s"] > 0 and 0 <= record["data_wait"] <= 1 and "peak_mem_gib" not in record
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 4]
    out = capsys.readouterr().out
    assert "step 3/7 epoch 0 | loss 3.0000 (instance 6.0000)" in out
    assert out.count("undecodable samples replaced") == 1 and "| 2 undecodable samples replaced" in out


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricLogger(
        tmp_path, total_steps=2, start_step=0, global_batch=1, log_freq=1, device=torch.device("cpu"), enabled=False
    )
    logger.step(_metrics(1.0), data_seconds=0.1)
    assert logger.log(0, epoch=0)["loss"] == 1.0
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_format_record_shows_every_field():
    r = {"step": 5, "epoch": 0, "loss": 1.0, "group-sup.": 2.0, "lr": 1e-4, "wd": 0.04, "momentum": 0.99}
    r.update(teacher_temp=0.07, images_per_s=123.4, data_wait=0.25, peak_mem_gib=3.5)
    line = format_record(r, total_steps=10)
    for part in ("step 5/10", "group 2.0000", "lr 0.0001", "123 img/s", "data wait 25%", "peak mem 3.5 GiB"):
        assert part in line


def test_code_version_of_this_checkout():
    version = code_version()
    assert len(version["commit"]) == 40 and isinstance(version["dirty"], bool)


def test_a_resumed_run_forgets_what_was_logged_after_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    logger = MetricLogger(
        tmp_path, total_steps=9, start_step=5, global_batch=1, log_freq=1, device=torch.device("cpu"), enabled=True
    )
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_damaged_lines_are_dropped_with_a_warning_and_the_file_stays_json_lines(tmp_path):
    good = [json.dumps({"step": s, "loss": 1.0}) for s in (2, 4, 6)]
    damaged = [good[0], "\x00\x00\x00", '{"loss": 1.0}', good[1], good[2]]  # a zero-filled block, a non-record
    (tmp_path / "metrics.jsonl").write_text("\n".join(damaged))  # and a last line without its newline
    with pytest.warns(RuntimeWarning, match=r"dropped 2 damaged line\(s\) \(lines \[2, 3\]\)"):
        logger = MetricLogger(
            tmp_path, total_steps=9, start_step=6, global_batch=1, log_freq=1, device=torch.device("cpu"), enabled=True
        )
    logger.step(_metrics(1.0), data_seconds=0.0)
    logger.log(6, epoch=0)
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 7]


def test_learning_curves_plot_the_losses_and_the_knn_of_every_epoch(tmp_path):
    knn = lambda top1: {"k": {"20": {"top1": top1, "top5": 100.0}}}  # noqa: E731
    records = [{"step": s, "epoch": s // 4, "loss": 5.0 - s / 10, "group-sup.": 4.0} for s in range(1, 9)]
    records[4:4] = [{"step": 4, "epoch": 0, "knn": knn(30.0)}]
    records.append({"step": 8, "epoch": 1, "knn": knn(42.5)})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert knn_per_epoch(records) == [{"epoch": 1, "top1": 30.0}, {"epoch": 2, "top1": 42.5}]
    png = plot_learning_curves(metrics, tmp_path / "curves.png", initial_knn=20.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
