"""One training step of the demo config (configs/demo.yaml: tiny SAM, 192 px, batch 8, Conv-LoRA) on a fixed
random batch, for the step benchmarks and the profile table (scripts/bench_losses.py, scripts/profile_step.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def demo_step(total_steps: int):
    """(run_one_step, cfg): a callable that runs one training step of the demo model on the same batch."""
    import yaml

    from samft.config import config_from_dict
    from samft.engine.train.loop import train_step
    from samft.engine.train.setup import build_training

    warnings.filterwarnings("ignore")
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["train"].update({"device": "cpu", "progress": False})
    cfg = config_from_dict(raw)
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=total_steps)
    parts.model.train()
    b, s = cfg.train.batch_size, cfg.model.img_size
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(b, 3, s, s, generator=g), "mask": (torch.rand(b, s, s, generator=g) > 0.7),
             "valid_hw": torch.tensor([[s, s]] * b)}
    return (lambda: train_step(parts, [{"labelled": batch}])), cfg
