"""Shared fixtures: tiny SAM configs, synthetic data, the real samples in ../shared/data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from samft.config import Config, config_from_dict
from samft.data.synthetic import write_dataset
from samft.peft import all_methods

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
METHODS = sorted(all_methods())

# one thread per xdist worker (two workers share two cores), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def load_script(name: str):
    """A script of scripts/ imported as a module (the scripts are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real sample data not available: {path} is absent (see ../shared/data/SOURCES.md)")
    return path


# the files a finished training leaves in its run directory
RUN_FILES = {"config.yaml", "adapter.safetensors", "adapter_last.safetensors", "state.safetensors", "metrics.csv", "split.json",
             "curves.png", ".samft-run"}

TINY = {"type": "tiny", "img_size": 64,
        "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1],
                 "out_chans": 32, "decoder_depth": 2, "decoder_mlp_dim": 64, "decoder_heads": 2}}


def tiny_config(method: str = "conv_lora", **sections) -> Config:
    """A tiny-SAM config (img 64, width 32) with ``method``; ``sections`` are merged in."""
    data = {"model": dict(TINY), "peft": {"method": method},
            "train": {"epochs": 1, "batch_size": 2, "progress": False, "device": "cpu"},
            "data": {"num_workers": 0}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


def sam_attention(dim: int = 48, heads: int = 3, input_size: tuple[int, int] = (4, 6), lora: bool = False,
                  freeze: str = "qkv"):
    """segment_anything's Attention (float32) with random rel-pos tables and, with ``lora``, a trained-looking
    LoRA on qkv (``freeze``: "qkv" freezes the wrapped qkv only, "all" every SAM tensor of the block)."""
    from segment_anything.modeling.image_encoder import Attention

    from samft.peft.lora import LoRALinear

    torch.manual_seed(0)
    attn = Attention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=input_size)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    if lora:
        (attn if freeze == "all" else attn.qkv).requires_grad_(False)
        attn.qkv = LoRALinear(attn.qkv, rank=4, alpha=8.0)
        with torch.no_grad():
            attn.qkv.lora_B.normal_(0, 0.2)
    return attn


def perturb_trainable(model_or_params, seed: int = 0, scale: float = 0.05):
    """Move every trainable tensor (of a module, or an iterable of parameters) off its initialisation by
    ``scale`` x N(0, 1) noise from its own generator, so that zero-initialised adapter parts matter and get
    gradients; returns what it was given."""
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model_or_params


def interrupt_after(monkeypatch, n_steps: int) -> None:
    """Make training raise KeyboardInterrupt (as Ctrl-C) when it starts optimizer step ``n_steps + 1``."""
    import samft.engine.train.loop as train_mod

    real = train_mod.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        if calls["n"] == n_steps:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)


def classes_dir(root: Path) -> Path:
    """8 noisy 64x64 images with class-id masks (images/, masks/): background 0, a rectangle of class 1 and
    one of class 2."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(8):
        mask = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(0, 32, 2)
        mask[y:y + 24, x:x + 20] = 1
        mask[40:60, 4 + i * 4:20 + i * 4] = 2
        image = (rng.integers(0, 60, (64, 64, 3)) + mask[..., None] * 80).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """24 synthetic image/mask pairs (images/ and masks/)."""
    return write_dataset(tmp_path_factory.mktemp("synthetic"), n=24, seed=1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMFT_CACHE", str(tmp_path / "cache"))
    warnings.filterwarnings("ignore", message=".*random weights.*")


def checkpointed_step(model, images, checkpointing: bool):
    """One forward + backward of ``model`` (masks' mean square + its auxiliary loss), the gate noise seeded:
    (loss, aux loss, gradients by parameter name)."""
    import torch

    model.grad_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # same gate noise in both runs
    out = model(images)
    loss = out.masks.square().mean() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(out.aux_loss.detach()), grads


def check_checkpointing(model, images) -> tuple[float, dict]:
    """``model`` (training mode) gives the same loss (1e-6), auxiliary loss and gradients (1e-5) with and without
    gradient checkpointing, and with it each encoder block runs again in the backward pass (when anything in the
    encoder needs gradients); returns the auxiliary loss and the gradients of the plain step."""
    import pytest
    import torch

    loss0, aux0, grads0 = checkpointed_step(model, images, False)
    calls = []
    hooks = [blk.register_forward_pre_hook(lambda *a: calls.append(1)) for blk in model.image_encoder.blocks]
    loss1, aux1, grads1 = checkpointed_step(model, images, True)
    for h in hooks:
        h.remove()
    encoder_trains = any(p.requires_grad for p in model.image_encoder.parameters())
    assert len(calls) == len(model.image_encoder.blocks) * (2 if encoder_trains else 1)
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-7)
    assert aux1 == pytest.approx(aux0, rel=1e-6, abs=1e-9)
    assert grads1.keys() == grads0.keys()
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)
    return aux0, grads0


def check_checkpointing_and_bf16(model, images) -> None:
    """``model`` (training mode) passes :func:`check_checkpointing`, and a bf16-autocast step gives finite
    outputs and gradients."""
    import torch

    check_checkpointing(model, images)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images).masks
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
