"""Invariants every registered PEFT method must keep (parametrised over the registry)."""

import pytest
import torch

from samft import peft
from samft.engine.checkpoint import load_adapter, save_adapter
from samft.errors import CheckpointError, ConfigError
from samft.model import build_model
from samft.peft.inject import AdapterLayer

from conftest import METHODS, tiny_config


def _build(method, **sections):
    return build_model(tiny_config(method, **sections))


def _adapter_param_names(model):
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            for p_name, _ in module.named_parameters():
                if not p_name.startswith("base_layer."):
                    names.add(f"{mod_name}.{p_name}")
    return names


def _perturb_trainable(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_registry_lists_the_methods():
    assert {"conv_lora", "lora", "decoder_only"} <= set(METHODS)
    with pytest.raises(ConfigError, match="unknown PEFT method 'conv-lora'.*did you mean 'conv_lora'"):
        peft.get("conv-lora")


@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_and_decoder_train(method):
    built = _build(method)
    model = built.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    expected = decoder | _adapter_param_names(model)
    if peft.get(method).adapts_encoder:
        assert built.adapted, "an encoder method must report what it adapted"
        assert trainable - decoder, "an encoder method must add trainable encoder parameters"
    assert trainable == expected
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_base_weights_unchanged_after_a_step(method):
    model = _build(method).model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    (out.masks.sigmoid().mean() + out.aux_loss).backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any(n.startswith("decoder.") for n in changed)
    if method in ("lora", "conv_lora"):
        assert any(".lora_B" in n for n in changed), "the adapters must receive gradients"


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_gives_the_frozen_models_output(method):
    images = torch.randn(2, 3, 64, 64)
    base = _build("decoder_only").model.eval()
    adapted = _build(method).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(images).masks, base(images).masks, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    built = _build(method)
    model = built.model.eval()
    _perturb_trainable(model)
    path = tmp_path / "adapter.safetensors"
    meta = {"sam_type": "tiny", "base_sha256": built.base_sha256, "peft_method": method}
    save_adapter(model, path, meta)
    fresh = _build(method)
    loaded_meta = load_adapter(fresh.model, path, {"sam_type": "tiny", "base_sha256": fresh.base_sha256,
                                                   "peft_method": method})
    assert loaded_meta["peft_method"] == method and loaded_meta["samft_version"]
    images = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.eval()(images).masks, model(images).masks)


@pytest.mark.parametrize("method", METHODS)
def test_batch_and_non_square(method):
    model = _build(method).model.train()
    out = model(torch.randn(3, 3, 48, 80))
    assert out.masks.shape == (3, 1, 12, 20)
    assert torch.isfinite(out.masks).all() and torch.isfinite(out.aux_loss)


def test_adapter_refuses_another_base(tmp_path):
    built = _build("lora")
    path = tmp_path / "a.safetensors"
    save_adapter(built.model, path, {"sam_type": "tiny", "base_sha256": built.base_sha256, "peft_method": "lora"})
    other = build_model(tiny_config("lora", model={"seed": 1}))  # different random base weights
    with pytest.raises(CheckpointError, match="base checkpoint sha256"):
        load_adapter(other.model, path, {"sam_type": "tiny", "base_sha256": other.base_sha256, "peft_method": "lora"})
    with pytest.raises(CheckpointError, match="SAM type 'tiny', but this model has 'vit_b'"):
        load_adapter(built.model, path, {"sam_type": "vit_b"})
    conv = _build("conv_lora")
    with pytest.raises(CheckpointError, match="PEFT method 'lora', but this model has 'conv_lora'"):
        load_adapter(conv.model, path, {"peft_method": "conv_lora"})
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_adapter(conv.model, path)


def test_no_matching_module_is_an_error():
    cfg = tiny_config("lora")
    encoder = build_model(tiny_config("decoder_only")).model.image_encoder
    for blk in encoder.blocks:  # remove every qkv Linear so nothing can match
        blk.attn.qkv = torch.nn.Identity()
    with pytest.raises(ConfigError, match="no module of the image encoder matched"):
        peft.get("lora").apply(encoder, cfg.peft.lora)


@pytest.mark.parametrize("targets", [["qkv", "proj"], ["lin1", "lin2"]])
def test_targets_choose_the_wrapped_linears(targets):
    built = _build("lora", peft={"method": "lora", "lora": {"targets": targets}})
    assert {n.rsplit(".", 1)[-1] for n in built.adapted} == set(targets)
    assert len(built.adapted) == 2 * len(targets)  # two blocks in the tiny model


def test_lora_merge_equals_unmerged():
    built = _build("lora")
    model = built.model.eval()
    _perturb_trainable(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images).masks
        assert peft.get("lora").merge(model.image_encoder) == 2
        after = model(images).masks
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
