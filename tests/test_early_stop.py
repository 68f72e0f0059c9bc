"""Early stopping (``train.patience``): the run stops when the selection metric has not improved for that many
validations, says so in one line, and the count lives in the resumable state (a resume continues it exactly,
a kill between the best adapter and the state included; a run that stopped early does nothing on resume)."""

from __future__ import annotations

import warnings

import pytest

from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.artifacts.state import load_resume_state
from samft.engine.train import checkpointer as checkpointer_mod
from samft.engine.train import loop as loop_mod
from samft.engine.train.loop import TrainingInterrupted, train

from conftest import interrupt_after, tiny_config


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flat-metric and small-validation-set warnings
        yield


def _cfg(tmp_path, data_dir, patience, epochs, lr=0.0):
    """decoder_only at lr 0 (tests/test_engine.py::test_a_run_that_learnt_nothing_is_said): every validation
    gives the same Sm, so none after the first improves. 18 training images of batch 4, accum 2: 3 steps an epoch."""
    train_opts = {"epochs": epochs, "patience": patience, "batch_size": 4, "accum_steps": 2, "lr": lr,
                  "log_every": 1, "save_every": 0, "progress": False, "device": "cpu", "seed": 5}
    return tiny_config("decoder_only", data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                       train=train_opts, output={"dir": str(tmp_path / "run")})


def _epochs(run) -> list[int]:
    return [int(r["epoch"]) for r in read_metrics(run / "metrics.csv") if r["kind"] == "epoch"]


def _progress(run) -> dict:
    return load_resume_state(run / "state.safetensors")["progress"]


def test_a_run_whose_metric_cannot_improve_stops_after_patience_validations(tmp_path, synthetic_dir, capsys):
    run = train(_cfg(tmp_path, synthetic_dir, patience=1, epochs=4), show_progress=False)
    assert _epochs(run) == [1, 2]
    assert _progress(run)["since_best"] == 1 and _progress(run)["epoch"] == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "stopped early" in line]
    assert len(said) == 1
    assert said[0].startswith("stopped early at epoch 2: no improvement of Sm for 1 validation (best ")
    assert said[0].endswith(" at epoch 2)")  # the tie goes to the later epoch, as the best adapter


def test_patience_off_and_a_last_epoch_are_no_early_stop(tmp_path, synthetic_dir, capsys):
    """patience 0 runs every epoch; a patience reached at the last epoch is the end anyway: not said."""
    run = train(_cfg(tmp_path, synthetic_dir, patience=0, epochs=3), show_progress=False)
    assert _epochs(run) == [1, 2, 3]
    (tmp_path / "two").mkdir()
    run = train(_cfg(tmp_path / "two", synthetic_dir, patience=1, epochs=2), show_progress=False)
    assert _epochs(run) == [1, 2]
    assert "stopped early" not in capsys.readouterr().err


def test_resume_continues_the_count_and_a_stopped_run_does_nothing(tmp_path, synthetic_dir, monkeypatch, capsys):
    """patience 2: uninterrupted, epochs 1 (improves), 2, 3 (no improvement) and stop. Ctrl-C in epoch 3
    (after step 7) saves a count of 1; the resumed run stops at epoch 3, not at 4 (a count started again)."""
    cfg = _cfg(tmp_path, synthetic_dir, patience=2, epochs=5)
    interrupt_after(monkeypatch, 7)
    with pytest.raises(TrainingInterrupted):
        train(cfg, show_progress=False)
    assert (_progress(tmp_path / "run")["since_best"], _progress(tmp_path / "run")["step"]) == (1, 7)
    monkeypatch.undo()
    run = train(cfg, resume=True, show_progress=False)
    assert _epochs(run) == [1, 2, 3]
    assert "stopped early at epoch 3: no improvement of Sm for 2 validations" in capsys.readouterr().err
    state = (run / "state.safetensors").read_bytes()
    metrics = (run / "metrics.csv").read_text()
    train(cfg, resume=True, show_progress=False)
    err = capsys.readouterr().err
    assert f"{run} stopped early at epoch 3: no improvement of Sm for 2 validations" in err
    assert "nothing to do" in err
    assert (run / "state.safetensors").read_bytes() == state and (run / "metrics.csv").read_text() == metrics
    run = train(_cfg(tmp_path, synthetic_dir, patience=3, epochs=5), resume=True, show_progress=False)  # trains on
    assert _epochs(run) == [1, 2, 3, 4]


class _Kill(BaseException):
    """A hard kill (not Ctrl-C: nothing is saved on the way out)."""


def test_a_kill_between_the_best_adapter_and_the_state_keeps_the_count(tmp_path, synthetic_dir, monkeypatch):
    """Scripted Sm per epoch: 0.5, 0.6 (improves), 0.6, 0.6 ... with patience 2: stop at epoch 4. Killed after the
    best adapter of epoch 2 (an improvement) and of epoch 3 (a tie) are written, before their states: each
    resume replays the epoch and counts it as the uninterrupted run did."""
    values = {1: 0.5, 2: 0.6}
    real_validate, real_save = loop_mod.Fit._validate, checkpointer_mod.Checkpointer.save

    def scripted(self, epoch_no):
        return {**real_validate(self, epoch_no), "Sm": values.get(epoch_no, 0.6)}

    def kill_at(epoch):
        def save(self, state, *args):
            if state.epoch == epoch and state.micro_in_epoch == 0:  # the end of epoch ``epoch``
                raise _Kill
            return real_save(self, state, *args)
        monkeypatch.setattr(checkpointer_mod.Checkpointer, "save", save)

    monkeypatch.setattr(loop_mod.Fit, "_validate", scripted)
    cfg = _cfg(tmp_path, synthetic_dir, patience=2, epochs=5)
    kill_at(2)
    with pytest.raises(_Kill):
        train(cfg, show_progress=False)
    kill_at(3)
    with pytest.raises(_Kill):
        train(cfg, resume=True, show_progress=False)
    assert _progress(tmp_path / "run")["since_best"] == 0
    monkeypatch.setattr(checkpointer_mod.Checkpointer, "save", real_save)
    run = train(cfg, resume=True, show_progress=False)
    assert _epochs(run) == [1, 2, 3, 4]
    assert _progress(run)["since_best"] == 2
