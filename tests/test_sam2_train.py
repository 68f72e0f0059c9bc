"""Training features on a tiny SAM 2.1 run: exact resume after an interruption, activation checkpointing
(same loss and gradients), bf16 autocast on the CPU, the Segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import samft
from samft.engine.artifacts.adapter import read_adapter
from samft.engine.artifacts.state import load_resume_state
from samft.engine.train.loop import TrainingInterrupted, train
from samft.model import build_model

from conftest import check_checkpointing, interrupt_after, perturb_trainable, tiny_config

SAM2 = {"family": "sam2", "type": "tiny", "img_size": 64}


def _cfg(tmp_path, data_dir, name, method="conv_lora", **train_opts):
    opts = {"epochs": 2, "batch_size": 4, "accum_steps": 2, "lr": 1e-3, "log_every": 1, "save_every": 0,
            "progress": False, "device": "cpu", "seed": 5, **train_opts}
    return tiny_config(method, model=SAM2, data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                       train=opts, output={"dir": str(tmp_path / name)})


def _weights(run_dir, name="adapter_last.safetensors"):
    return read_adapter(run_dir / name)[0]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, synthetic_dir, monkeypatch):
    straight = train(_cfg(tmp_path, synthetic_dir, "straight", epochs=1), show_progress=False)
    interrupt_after(monkeypatch, 2)  # mid-epoch (3 optimizer steps of 2 accumulated batches per epoch)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 2"):
        train(_cfg(tmp_path, synthetic_dir, "resumed", epochs=1), show_progress=False)
    assert load_resume_state(tmp_path / "resumed" / "state.safetensors")["progress"]["step"] == 2
    monkeypatch.undo()
    train(_cfg(tmp_path, synthetic_dir, "resumed", epochs=1), resume=True, show_progress=False)
    a, b = _weights(straight), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["conv_lora", "lora", "full"])
def test_checkpointing_gives_the_same_loss_and_gradients(method):
    model = perturb_trainable(build_model(tiny_config(method, model=SAM2)).model.train())
    _, grads0 = check_checkpointing(model, torch.randn(2, 3, 64, 96))
    assert any(k.startswith("image_encoder.") for k in grads0)  # the encoder trains: each block ran twice


def test_bf16_checkpointed_training_on_cpu(tmp_path, synthetic_dir):
    run = train(_cfg(tmp_path, synthetic_dir, "bf16", epochs=1, max_steps=2, precision="bf16",
                     grad_checkpointing=True), show_progress=False)
    weights = _weights(run)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(t.dtype == torch.float32 for t in weights.values()), "autocast keeps float32 master weights"


def test_segmenter_predicts_what_predict_writes(tmp_path, synthetic_dir):
    from samft.engine.infer.predict import predict_run

    run = train(_cfg(tmp_path, synthetic_dir, "seg", method="lora", epochs=1), show_progress=False)
    images = sorted((synthetic_dir / "images").iterdir())[:3]
    written = predict_run(run, [str(p) for p in images], tmp_path / "preds", device="cpu", show_progress=False)
    seg = samft.Segmenter.from_run(run, device="cpu")
    masks = seg.predict_batch([str(p) for p in images], batch_size=2)
    for mask, png, image in zip(masks, written, images):
        assert mask.shape == Image.open(image).size[::-1] and mask.dtype == bool
        assert np.array_equal(mask, np.array(Image.open(png)) > 0), png
