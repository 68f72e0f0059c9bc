"""No file in a run directory is written through a link placed there: appends (resumes.jsonl, metrics.csv)
refuse a link in one line, whole-file writes (curves.png, config.yaml ...) replace the link itself."""

from __future__ import annotations

import os

import pytest

from samft.engine.artifacts.metrics_csv import MetricsLog
from samft.engine.artifacts.rundir import read_run_config
from samft.engine.train.loop import train
from samft.errors import SamftError
from samft.files import append_text

from conftest import tiny_config


def test_append_text_appends_and_refuses_a_link(tmp_path):
    append_text(tmp_path / "log.jsonl", "a\n")
    append_text(tmp_path / "log.jsonl", "b\n")
    assert (tmp_path / "log.jsonl").read_text() == "a\nb\n"
    target = tmp_path / "elsewhere.txt"
    target.write_text("user's file\n")
    os.symlink(target, tmp_path / "link.jsonl")
    with pytest.raises(SamftError, match="link.jsonl: is a symlink"):
        append_text(tmp_path / "link.jsonl", "c\n")
    assert target.read_text() == "user's file\n"


def test_a_link_placed_at_metrics_csv_during_training_is_refused(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv", ["kind", "epoch", "step"], enabled=True)
    log.write({"kind": "step", "epoch": 0, "step": 1})
    target = tmp_path / "elsewhere.csv"
    target.write_text("user's data\n")
    (tmp_path / "metrics.csv").unlink()
    os.symlink(target, tmp_path / "metrics.csv")
    with pytest.raises(SamftError, match="metrics.csv: is a symlink"):
        log.write({"kind": "step", "epoch": 0, "step": 2})
    assert target.read_text() == "user's data\n"


@pytest.fixture
def trained(tmp_path, synthetic_dir):
    cfg = tiny_config("lora", data={"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25},
                      train={"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu", "save_every": 0},
                      output={"dir": str(tmp_path / "run")})
    return train(cfg, show_progress=False)


def _resume(run, *overrides):
    cfg = read_run_config(run, list(overrides))
    cfg.output.dir = str(run)
    return train(cfg, resume=True, show_progress=False)


def test_resume_never_appends_through_links_in_the_run(trained, tmp_path):
    run = trained
    outside = {name: tmp_path / f"outside-{name}" for name in ("resumes.jsonl", "metrics.csv", "curves.png")}
    for name, target in outside.items():
        target.write_text(f"the user's {name}\n")
        (run / name).unlink(missing_ok=True)
        os.symlink(target, run / name)
    config = (run / "config.yaml").read_text()
    # resumes.jsonl is appended: a link there is refused in one line, before the config is rewritten
    with pytest.raises(SamftError, match="resumes.jsonl: is a symlink"):
        _resume(run, "train.epochs=2")
    assert (run / "config.yaml").read_text() == config
    (run / "resumes.jsonl").unlink()
    _resume(run, "train.epochs=2")  # metrics.csv and curves.png: the links are replaced by the run's own files
    for name, target in outside.items():
        assert target.read_text() == f"the user's {name}\n", name
    for name in ("metrics.csv", "curves.png", "resumes.jsonl"):
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert "train.epochs" in (run / "resumes.jsonl").read_text()
