"""Training-loop guarantees: exact resume after an interruption, NaN stops keep the last good state."""

from __future__ import annotations

import pytest
import torch

from samft.engine.artifacts.state import load_resume_state

from samft.engine.artifacts.adapter import read_adapter
from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.train.loop import TrainingDiverged, TrainingInterrupted, lr_factor, train

from conftest import interrupt_after, tiny_config


def _cfg(tmp_path, data_dir, name, **train_opts):
    opts = {"epochs": 2, "batch_size": 4, "accum_steps": 2, "lr": 1e-3, "log_every": 1, "save_every": 0,
            "progress": False, "device": "cpu", "seed": 5, **train_opts}
    return tiny_config("conv_lora", data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                       train=opts, output={"dir": str(tmp_path / name)})


def test_lr_schedule():
    assert [round(lr_factor(s, 2, 10, 0.0), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(100, 0, 10, 0.1) == 0.1


@pytest.mark.parametrize("stop_at", [2, 3])  # mid-epoch (2) and on the epoch boundary (3 steps per epoch)
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, synthetic_dir, monkeypatch, stop_at):
    straight = train(_cfg(tmp_path, synthetic_dir, "straight"), show_progress=False)

    interrupt_after(monkeypatch, stop_at)
    cfg = _cfg(tmp_path, synthetic_dir, "resumed")
    with pytest.raises(TrainingInterrupted, match=f"interrupted at step {stop_at}"):
        train(cfg, show_progress=False)
    assert load_resume_state(tmp_path / "resumed" / "state.safetensors")["progress"]["step"] == stop_at
    monkeypatch.undo()
    train(_cfg(tmp_path, synthetic_dir, "resumed"), resume=True, show_progress=False)

    a, _ = read_adapter(straight / "adapter_last.safetensors")
    b, _ = read_adapter(tmp_path / "resumed" / "adapter_last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _untimed_rows(straight) == _untimed_rows(tmp_path / "resumed")


def _untimed_rows(run_dir):
    """metrics.csv rows without the timing columns (which differ between any two runs)."""
    rows = read_metrics(run_dir / "metrics.csv")
    assert rows and "aux_balance" in rows[0]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path, synthetic_dir, monkeypatch):
    import samft.tasks.task as tasks_mod

    real = tasks_mod.structure_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # steps 1-2 fine (2 micro-batches each)

    monkeypatch.setattr(tasks_mod, "structure_loss", poisoned)
    cfg = _cfg(tmp_path, synthetic_dir, "nan", save_every=1, lr=3e-3, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3 \(epoch 1\)") as info:
        train(cfg, show_progress=False)
    state = load_resume_state(tmp_path / "nan" / "state.safetensors")
    assert state["progress"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    message = str(info.value)  # advice that works: --resume cannot change train.lr, a new run can
    assert f"the state saved before it is kept in {tmp_path / 'nan' / 'state.safetensors'}" in message
    assert f"samft train --config {tmp_path / 'nan' / 'config.yaml'} output.dir=NEW_DIR" in message
    assert "train.lr=0.001 (a third of 0.003)" in message and "train.grad_clip=1.0 (clipping is off)" in message
    assert "resume with --resume after lowering" not in message


def test_nan_loss_before_any_save_says_nothing_was_saved(tmp_path, synthetic_dir, monkeypatch):
    import samft.tasks.task as tasks_mod

    real = tasks_mod.structure_loss
    monkeypatch.setattr(tasks_mod, "structure_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    cfg = _cfg(tmp_path, synthetic_dir, "inf", lr=6e-4, grad_clip=0.5)
    with pytest.raises(TrainingDiverged, match=r"loss became inf at step 1 \(epoch 1\)") as info:
        train(cfg, show_progress=False)
    message = str(info.value)
    assert "nothing was saved (no resumable state)" in message and "kept in" not in message, message
    assert not (tmp_path / "inf" / "state.safetensors").exists()
    assert "samft train --config YOUR_CONFIG and train.lr=0.0002 (a third of 0.0006)" in message, message
    assert "train.grad_clip=0.25 (half of 0.5)" in message, message


def test_refuses_to_overwrite_a_run(tmp_path, synthetic_dir):
    cfg = _cfg(tmp_path, synthetic_dir, "once", epochs=1)
    train(cfg, show_progress=False)
    from samft.errors import SamftError

    with pytest.raises(SamftError, match="already holds a run"):
        train(_cfg(tmp_path, synthetic_dir, "once", epochs=1), show_progress=False)
    cfg = _cfg(tmp_path, synthetic_dir, "once", epochs=1)
    cfg.output.overwrite = True
    train(cfg, show_progress=False)


def test_retraining_over_a_run_says_what_of_the_replaced_run_it_kept(tmp_path, synthetic_dir):
    """--overwrite replaces samft's training files; the replaced model's predictions/ are the user's and stay,
    but a warning says they are not the new run's."""
    train(_cfg(tmp_path, synthetic_dir, "again", epochs=1), show_progress=False)
    (tmp_path / "again" / "predictions").mkdir()
    (tmp_path / "again" / "predictions" / "0000.png").write_bytes(b"old mask")
    cfg = _cfg(tmp_path, synthetic_dir, "again", epochs=1)
    cfg.output.overwrite = True
    with pytest.warns(UserWarning, match=r"again: predictions kept from the replaced run: not this run's outputs"):
        train(cfg, show_progress=False)
    assert (tmp_path / "again" / "predictions" / "0000.png").read_bytes() == b"old mask"
