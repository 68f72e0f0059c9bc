"""PEFT on SAM 2.1's Hiera through the same registry: every method builds, trains a step, saves and reloads
to the same outputs; adapters of one family are refused on the other."""

from __future__ import annotations

import pytest
import torch

from samft.config import config_from_dict
from samft.engine.artifacts.adapter import adapter_expectations, load_adapter, save_adapter
from samft.errors import CheckpointError, ConfigError
from samft.model import build_model
from samft.peft import all_methods
from tests.conftest import tiny_config

TINY2 = {"family": "sam2", "type": "tiny", "img_size": 64}
METHODS = sorted(m for m in all_methods() if m != "sam_adapter")


def sam2_config(method: str, **peft):
    return config_from_dict({"model": TINY2, "peft": {"method": method, **({method: peft} if peft else {})}})


def _step(model: torch.nn.Module, images: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    out = model(images)
    (out.masks.float().pow(2).mean() + out.aux_loss).backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_saves_and_reloads(method, tmp_path):
    cfg = sam2_config(method)
    built = build_model(cfg)
    model = built.model
    assert built.adapted or method == "decoder_only"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images).masks
    _step(model, images)
    with torch.no_grad():
        after = model(images).masks
    assert not torch.equal(before, after)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, adapter_expectations(cfg, built.base_sha256, built.model))
    fresh = build_model(cfg)
    load_adapter(fresh.model, path, adapter_expectations(cfg, fresh.base_sha256, fresh.model))
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.eval()(images).masks, after, rtol=0, atol=0)


def test_qkv_and_mlp_targets_are_the_attention_and_mlp_linears_only():
    adapted = build_model(sam2_config("lora", targets=["qkv", "proj", "lin1", "lin2"])).adapted
    # the tiny Hiera has 5 blocks; the width-changing blocks.i.proj of a stage's first block is not a target
    assert len(adapted) == 20 and all(n.split(".")[2] in ("attn", "mlp") for n in adapted)


def test_conv_lora_experts_see_the_token_grid():
    """Windowed Hiera blocks call qkv on (B * windows, ws, ws, C) and global ones on (B, H, W, C): the experts
    convolve that grid (the pre-pooling grid at a stage's first block, whose queries are pooled after qkv)."""
    from samft.peft.conv_lora import ConvLoRALinear

    model = build_model(sam2_config("conv_lora")).model.eval()
    seen = []
    for layer in model.modules():
        if isinstance(layer, ConvLoRALinear):
            layer.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert all(len(s) == 4 for s in seen) and len(seen) == 5


def test_sam_adapter_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="sam_adapter is not available for model.family=sam2") as e:
        sam2_config("sam_adapter")
    assert "\n" not in str(e.value)


def test_an_adapter_of_one_family_is_refused_on_the_other(tmp_path):
    sam2 = sam2_config("lora")
    built = build_model(sam2)
    path = tmp_path / "sam2.safetensors"
    save_adapter(built.model, path, adapter_expectations(sam2, built.base_sha256, built.model))
    sam1 = tiny_config("lora")
    other = build_model(sam1)
    with pytest.raises(CheckpointError, match="model family .model.family. 'sam2', but this model has 'sam'"):
        load_adapter(other.model, path, adapter_expectations(sam1, other.base_sha256, other.model))
    path1 = tmp_path / "sam1.safetensors"
    save_adapter(other.model, path1, adapter_expectations(sam1, other.base_sha256, other.model))
    with pytest.raises(CheckpointError, match="model family .model.family. 'sam', but this model has 'sam2'"):
        load_adapter(built.model, path1, adapter_expectations(sam2, built.base_sha256, built.model))
