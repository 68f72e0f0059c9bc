"""SLIP on SAM 2.1: the SSL projection head and the region-text head take the FPN neck's width (the
embeddings the decoder reads), the text class head classifies SAM 2's mask tokens; a tiny run trains with
both losses and logs them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.train.loop import train
from samft.engine.train.setup import build_training
from samft.slip.text import TextClassHead

from test_slip_train import _cfg as ssl_cfg, _voc_cfg

SAM2 = {"family": "sam2", "type": "tiny", "img_size": 64}


def _sam2(cfg, **model):
    """``cfg`` on the tiny SAM 2.1 (neck width 32 like the tiny SAM's, so d_model 48 tells them apart)."""
    tiny = dataclasses.replace(cfg.model.tiny_hiera, d_model=48)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, family="sam2", tiny_hiera=tiny, **model))


def _steps(run):
    return [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "step"]


def test_text_class_head_and_region_text_loss_train_on_sam2(tmp_path):
    cfg = _sam2(_voc_cfg(tmp_path, "clip", weight=0.5, max_steps=2), class_head="text")
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=2)
    assert parts.model.feature_channels == 48 and parts.model(torch.randn(1, 3, 64, 64)).features.shape[1] == 48
    assert parts.extra_modules["clip"].proj.in_features == 48
    assert isinstance(parts.model.decoder.class_head, TextClassHead)
    run = train(cfg, show_progress=False)
    assert all(float(r["aux_clip"]) > 0 for r in _steps(run))


def test_ssl_loss_trains_on_sam2(tmp_path, synthetic_dir):
    cfg = _sam2(ssl_cfg(tmp_path, synthetic_dir, "ssl", weight=1.0, epochs=1, max_steps=2))
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=2)
    assert parts.extra_modules["unlabelled"].mlp.layer1.in_features == 48
    run = train(cfg, show_progress=False)
    steps = _steps(run)
    assert steps and all(float(r["aux_ssl"]) > 0 for r in steps)
