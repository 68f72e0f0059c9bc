"""``train.val_every`` > 1: validation every N epochs *and* at the last epoch, whatever N."""

from __future__ import annotations

import pytest

from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.train.loop import train

from conftest import tiny_config


@pytest.mark.parametrize("epochs, val_every, validated", [(3, 2, [2, 3])])
def test_val_every_still_validates_the_last_epoch(tmp_path, synthetic_dir, epochs, val_every, validated):
    cfg = tiny_config("conv_lora", data={"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25},
                      train={"epochs": epochs, "val_every": val_every, "batch_size": 9, "accum_steps": 1,
                             "lr": 1e-3, "log_every": 1, "save_every": 0, "progress": False, "device": "cpu",
                             "seed": 3},
                      output={"dir": str(tmp_path / "run")})
    run_dir = train(cfg, show_progress=False)
    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r["kind"] == "epoch"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    metric = "val_Sm"  # the binary task's selection metric
    assert [int(r["epoch"]) for r in rows if r.get(metric) not in (None, "")] == validated
