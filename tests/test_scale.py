"""Training with the speed/memory options: checkpointing, precision, torch.compile (library level)."""

from __future__ import annotations

import pytest
import torch

import samft.engine.runtime as runtime
from samft.engine.artifacts.adapter import read_adapter
from samft.engine.train.loop import train
from samft.errors import ConfigError

from conftest import tiny_config


def _cfg(tmp_path, data_dir, name, method="conv_lora", **train_opts):
    opts = {"epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 0,
            "progress": False, "device": "cpu", "seed": 3, **train_opts}
    return tiny_config(method, data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                       train=opts, output={"dir": str(tmp_path / name)})


def _weights(run_dir):
    return read_adapter(run_dir / "adapter_last.safetensors")[0]


def _assert_same_weights(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)


def test_checkpointed_training_equals_plain_training(tmp_path, synthetic_dir):
    plain = train(_cfg(tmp_path, synthetic_dir, "plain"), show_progress=False)
    ckpt = train(_cfg(tmp_path, synthetic_dir, "ckpt", grad_checkpointing=True), show_progress=False)
    _assert_same_weights(_weights(ckpt), _weights(plain), rtol=1e-5, atol=1e-6)


def test_bf16_training_on_cpu(tmp_path, synthetic_dir):
    run = train(_cfg(tmp_path, synthetic_dir, "bf16", precision="bf16", grad_checkpointing=True),
                show_progress=False)
    weights = _weights(run)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(t.dtype == torch.float32 for t in weights.values()), "autocast keeps float32 master weights"


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", cpu)


def test_compiled_training_equals_eager_training(tmp_path, synthetic_dir, monkeypatch):
    """The compile plumbing (per-block Module.compile, with checkpointing) with the tracing-only
    aot_eager backend: inductor's code generation takes minutes on a CPU (see the CUDA test below)."""
    plain = train(_cfg(tmp_path, synthetic_dir, "plain", grad_checkpointing=True), show_progress=False)
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    compiled = train(_cfg(tmp_path, synthetic_dir, "compiled", compile=True, grad_checkpointing=True),
                     show_progress=False)
    torch._dynamo.reset()
    _assert_same_weights(_weights(compiled), _weights(plain), rtol=1e-5, atol=1e-6)


def test_compile_unavailable_is_a_clear_error(tmp_path, synthetic_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match=r"train.compile: torch.compile \(backend inductor\) is unavailable on cpu: "
                                          r"RuntimeError: no working C\+\+ compiler found; set train.compile=false"):
        train(_cfg(tmp_path, synthetic_dir, "broken", compile=True), show_progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor compilation is tested on CUDA (minutes on a CPU)")
def test_inductor_compiled_bf16_training_on_cuda(tmp_path, synthetic_dir):
    plain = train(_cfg(tmp_path, synthetic_dir, "plain", device="cuda", precision="bf16"), show_progress=False)
    torch._dynamo.reset()
    compiled = train(_cfg(tmp_path, synthetic_dir, "compiled", device="cuda", precision="bf16", compile=True),
                     show_progress=False)
    torch._dynamo.reset()
    _assert_same_weights(_weights(compiled), _weights(plain), rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs a CUDA device")
def test_fp16_training_with_grad_scaler_on_cuda(tmp_path, synthetic_dir):
    run = train(_cfg(tmp_path, synthetic_dir, "fp16", device="cuda", precision="fp16", grad_checkpointing=True),
                show_progress=False)
    assert all(torch.isfinite(t).all() for t in _weights(run).values())
