"""Metrics computed at ``eval.threshold`` are named after it everywhere (``dice@0.3``): eval.json, metrics.csv,
the selection by ``train.metric``, the per-image CSV; files of earlier versions (``val_dice@0.5`` at 0.3) still
resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samft.config.metric_names import at_threshold_name, base_name, higher_is_better
from samft.engine.artifacts.metrics_csv import MetricsLog, metrics_columns, read_metrics
from samft.engine.infer.evaluate import evaluate_run
from samft.engine.train.loop import train
from samft.tasks.metrics import BinaryMetrics
from samft.tasks.task import BinaryTask

from conftest import tiny_config
from test_export import make_run

AT_03 = {"dice@0.3", "iou@0.3", "BER@0.3"}
AT_05 = {"dice@0.5", "iou@0.5", "BER"}


def test_names_and_directions():
    assert at_threshold_name("dice@0.5", 0.3) == "dice@0.3" and at_threshold_name("BER", 0.25) == "BER@0.25"
    assert at_threshold_name("Sm", 0.3) == "Sm" and at_threshold_name("dice@0.5", 0.5) == "dice@0.5"
    assert [base_name(n) for n in ("dice@0.3", "iou@0.7", "BER@0.3", "dice", "Sm")] == \
        ["dice@0.5", "iou@0.5", "BER", "dice@0.5", "Sm"]
    assert higher_is_better("dice@0.3") and not higher_is_better("BER@0.3")
    task = BinaryTask(0.3)
    assert task.selection_metric("dice") == "dice@0.3" and task.selection_metric("auto") == "Sm"
    assert AT_03 <= set(task.metric_names) and not AT_05 & set(task.metric_names)
    assert set(BinaryTask(0.5).metric_names) >= AT_05


def test_compute_names_the_threshold():
    m = BinaryMetrics(0.3)
    m.update(np.full((8, 8), 0.4, np.float32), np.ones((8, 8), bool), "a")
    got = m.compute()
    assert AT_03 <= set(got) and not AT_05 & set(got) and got["dice@0.3"] == 1.0
    assert set(BinaryMetrics().compute()) >= AT_05


def test_eval_json_names_the_threshold_used(tmp_path, synthetic_dir):
    run, _ = make_run(tmp_path / "run", "lora", eval={"threshold": 0.3}, train={"metric": "dice"})
    results = evaluate_run(run, {"s": str(synthetic_dir)}, "cpu", show_progress=False)
    metrics = json.loads((run / "eval.json").read_text())["sets"]["s"]["metrics"]
    assert AT_03 <= set(metrics) and not AT_05 & set(metrics), metrics
    assert results["sets"]["s"]["sorted_by"] == "dice@0.3"


def test_training_selects_and_logs_at_the_threshold(tmp_path, synthetic_dir):
    cfg = tiny_config("lora", data={"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25},
                      train={"epochs": 1, "batch_size": 4, "metric": "dice"}, eval={"threshold": 0.3},
                      output={"dir": str(tmp_path / "run")})
    run = train(cfg, show_progress=False)
    rows = read_metrics(run / "metrics.csv")
    assert "val_dice@0.3" in rows[0] and "val_dice@0.5" not in rows[0]
    assert any(r["kind"] == "epoch" and r["val_dice@0.3"] for r in rows)


def test_an_earlier_versions_metrics_csv_carries_over_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    old = metrics_columns([], ("dice@0.5", "Sm"))  # an earlier version at eval.threshold 0.3
    MetricsLog(path, old, True).write({"kind": "epoch", "epoch": 1, "step": 3, "val_dice@0.5": 0.75, "val_Sm": 0.5})
    new = metrics_columns([], ("dice@0.3", "Sm"))
    MetricsLog(path, new, True, keep_rows=1)
    (row,) = read_metrics(path)
    assert float(row["val_dice@0.3"]) == pytest.approx(0.75) and float(row["val_Sm"]) == pytest.approx(0.5)
    assert "val_dice@0.5" not in row
