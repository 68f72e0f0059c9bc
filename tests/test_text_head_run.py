"""SLIP's text class head (``model.class_head=text``) as part of a trained model: it trains, its class-name
embeddings are saved with the adapter, and evaluation, prediction, resume and every export use that copy,
so they work when the embeddings' source file is gone."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from samft.cli import app
from samft.config import dump_yaml
from samft.engine.artifacts.adapter import read_adapter, save_adapter, trainable_state, adapter_expectations
from samft.engine.artifacts.export import export_run, load_exported
from samft.engine.artifacts.rundir import ADAPTER_FILE, CONFIG_FILE
from samft.engine.artifacts.loading import load_run
from samft.engine.infer.segmenter import Segmenter
from samft.engine.train.loop import TrainingInterrupted, train
from samft.errors import CheckpointError
from samft.model import build_model, describe
from samft.slip.text import TEXT_EMB_KEY, TextClassHead

from test_export import make_run

from conftest import classes_dir, interrupt_after, tiny_config

CLASSES = ["background", "a", "b"]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _embeddings(tmp_path):
    path = tmp_path / "emb" / "names.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True)
        np.save(path, np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    return path


def _cfg(tmp_path, name, method="lora", **train_opts):
    root = tmp_path / "classes"
    if not root.is_dir():
        classes_dir(root)
    opts = {"epochs": 2, "batch_size": 2, "lr": 3e-3, "log_every": 1, "save_every": 0, "progress": False,
            "device": "cpu", **train_opts}
    return tiny_config(method, model={"num_mask_tokens": 4, "class_head": "text",
                                      "text": {"embeddings": str(_embeddings(tmp_path))}},
                       data={"root": str(root), "train": ".", "classes": CLASSES, "val_fraction": 0.25},
                       train=opts, output={"dir": str(tmp_path / name)})


def _same_adapters(a, b, name="adapter_last.safetensors"):
    ta, tb = read_adapter(a / name)[0], read_adapter(b / name)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_the_text_head_trains_and_its_embeddings_travel_with_the_adapter(tmp_path):
    cfg = _cfg(tmp_path, "run")
    initial = build_model(cfg).model.decoder.class_head
    assert isinstance(initial, TextClassHead)
    run = train(cfg, show_progress=False)
    tensors, _ = read_adapter(run / ADAPTER_FILE)
    emb = torch.from_numpy(np.load(_embeddings(tmp_path)))
    torch.testing.assert_close(tensors[TEXT_EMB_KEY], F.normalize(emb, dim=-1))  # saved, never trained
    head = {k.split("class_head.")[1] for k in tensors if ".class_head." in k}
    assert head == {"proj.weight", "no_object", "logit_scale", "text_emb"}  # no Linear head left
    for name, p in initial.named_parameters():  # the head's own parameters learnt
        assert not torch.equal(tensors[f"decoder.class_head.{name}"], p.detach()), name

    _embeddings(tmp_path).unlink()  # the run carries its own copy from here on
    loaded = load_run(run, torch.device("cpu")).model
    assert isinstance(loaded.decoder.class_head, TextClassHead)
    torch.testing.assert_close(loaded.decoder.class_head.text_emb, tensors[TEXT_EMB_KEY], rtol=0, atol=0)
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    scores = Segmenter.from_run(run, device="cpu").predict_scores(image)
    assert scores.shape == (3, 64, 64) and np.isfinite(scores).all()

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--run", str(run), "--data", f"all={tmp_path / 'classes'}"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--run", str(run), "--out", str(out),
                                 str(tmp_path / "classes" / "images" / "0.png")])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["0.png"]
    assert json.loads((run / "eval.json").read_text())["sets"]["all"]["metrics"]["mIoU"] > 0


@pytest.mark.parametrize("file", ["changed", "deleted"])
def test_resume_uses_the_runs_own_embeddings_and_says_when_the_file_changed(tmp_path, monkeypatch, file):
    straight = train(_cfg(tmp_path, "s"), show_progress=False)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, "r"), show_progress=False)
    monkeypatch.undo()
    cfg = _cfg(tmp_path, "r")
    if file == "changed":  # edited after the run started: said, not used
        np.save(_embeddings(tmp_path), np.ones((3, 8), np.float32))
    else:  # gone: the run's own copy, quietly
        _embeddings(tmp_path).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, resume=True, show_progress=False)
    said = [str(w.message) for w in caught if "has changed" in str(w.message)]
    assert said == ([f"model.text.embeddings {_embeddings(tmp_path)} has changed since this run started; it resumes "
                     f"with the class-name embeddings it trained with (saved in the run)"] if file == "changed" else [])
    assert _same_adapters(straight, tmp_path / "r") and _same_adapters(straight, tmp_path / "r", ADAPTER_FILE)


def _text_run(tmp_path, method):
    """A run directory with a text class head and perturbed (trained-looking) weights -> (dir, model)."""
    run, model = make_run(tmp_path / "run", method, data={"classes": CLASSES},
                          model={"num_mask_tokens": 4, "class_head": "text",
                                 "text": {"embeddings": str(_embeddings(tmp_path))}})
    return run, model.eval()


@pytest.mark.parametrize("method", ["lora", "conv_lora"])  # merged (SAM checkpoint + head file) and unmerged
def test_exports_keep_the_text_head(method, tmp_path):
    run, model = _text_run(tmp_path, method)
    _embeddings(tmp_path).unlink()
    out = tmp_path / "export" / "model.pth"
    assert export_run(run, out).merged == (method == "lora")
    exported = load_exported(out)
    assert isinstance(exported.decoder.class_head, TextClassHead)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = exported(images), model(images)
    assert got.class_logits.shape == (2, 4, 4)  # 3 classes + "no object"
    torch.testing.assert_close(got.class_logits, want.class_logits, **TOLERANCE)
    torch.testing.assert_close(got.masks, want.masks, **TOLERANCE)


def test_onnx_export_of_the_text_head(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'samft[onnx]'")
    from samft.engine.artifacts.onnx_export import export_onnx

    run, _ = _text_run(tmp_path, "lora")
    result = export_onnx(run, tmp_path / "m.onnx", dynamic_batch=True)
    assert result.checks and all(d <= 1e-4 for d in result.checks.values()), result.checks


def test_an_adapter_without_the_embeddings_is_named(tmp_path):
    run, model = _text_run(tmp_path, "lora")
    tensors = {k: v for k, v in trainable_state(model).items() if k != TEXT_EMB_KEY}
    from safetensors.torch import save_file

    meta = read_adapter(run / ADAPTER_FILE)[1]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(run / ADAPTER_FILE), metadata=meta)
    with pytest.raises(CheckpointError, match=r"adapter.safetensors: its config has model.class_head=text but it "
                                              r"holds no class-name embeddings"):
        load_run(run, torch.device("cpu"))


@pytest.mark.parametrize("bad", [torch.zeros(2, 8), torch.zeros(3, 0), torch.zeros(3, 8, dtype=torch.int64)])
def test_stored_embeddings_of_the_wrong_shape_or_type_are_named(tmp_path, bad):
    from samft.slip.text import stored_text_embeddings

    cfg = _cfg(tmp_path, "x")
    with pytest.raises(CheckpointError, match=r"^adapter.safetensors: decoder.class_head.text_emb has shape "):
        stored_text_embeddings(cfg, {TEXT_EMB_KEY: bad}, "adapter.safetensors")


def test_info_counts_the_text_head_without_reading_weights(tmp_path):
    text = describe(_cfg(tmp_path, "x"))
    linear = _cfg(tmp_path, "y")
    linear.model.class_head = "linear"
    plain = describe(linear)
    # Linear(32 -> 4) has 132 parameters; the text head: proj 32 x 8, no-object 8, logit scale 1
    assert text["decoder_params"] - plain["decoder_params"] == 32 * 8 + 8 + 1 - (32 * 4 + 4)
    assert text["class_head"] == "text (3 classes x 8-d class-name embeddings)"
    assert plain["class_head"] == "linear (3 classes + no object)"


def test_training_clamps_the_text_heads_logit_scale_after_each_step(tmp_path, monkeypatch):
    """A scale started above ln 100 is ln 100 after training (the loop's post-step clamp, SLIP's rule)."""
    import math

    import samft.slip.text as text_mod
    from samft.engine.artifacts.adapter import read_adapter

    monkeypatch.setattr(text_mod, "LOGIT_SCALE_INIT", 7.0)
    run = train(_cfg(tmp_path, "clamped", epochs=1), show_progress=False)
    tensors = read_adapter(run / "adapter_last.safetensors")[0]
    scale = float(tensors["decoder.class_head.logit_scale"])
    assert scale == pytest.approx(math.log(100.0), abs=1e-6)
