"""Invariants every registered PEFT method must keep (parametrised over the registry)."""

import pytest
import torch

from samft import peft
from samft.engine.artifacts.adapter import load_adapter, save_adapter
from samft.errors import CheckpointError, ConfigError
from samft.model import build_model
from samft.peft.inject import AdapterLayer, is_wrapper

from conftest import METHODS, perturb_trainable, tiny_config


def _build(method, **sections):
    return build_model(tiny_config(method, **sections))


def _adapter_param_names(model):
    names = set()
    for mod_name, module in model.named_modules():
        if is_wrapper(module):
            for p_name, _ in module.named_parameters():
                if not p_name.startswith("base_layer."):
                    names.add(f"{mod_name}.{p_name}")
    return names



def _trains_base(method, encoder):
    rule = peft.get(method).trains_base
    return {f"image_encoder.{n}" for n in rule(encoder)} if rule else set()


def test_registry_lists_the_methods():
    assert {"conv_lora", "lora", "decoder_only", "full", "bitfit", "adapter", "sam_adapter", "vpt", "ssf"} <= set(METHODS)
    with pytest.raises(ConfigError, match="unknown PEFT method 'conv-lora'.*did you mean 'conv_lora'"):
        peft.get("conv-lora")


@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_and_decoder_train(method):
    built = _build(method)
    model = built.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    expected = decoder | _adapter_param_names(model) | _trains_base(method, model.image_encoder)
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
    if peft.get(method).adapts_encoder:
        got_grad = [n for n, p in model.image_encoder.named_parameters()
                    if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
        assert got_grad, "the encoder's trainable parameters must receive gradients"


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_gives_the_frozen_models_output(method):
    images = torch.randn(2, 3, 64, 64)
    base = _build("decoder_only").model.eval()
    adapted = _build(method).model.eval()
    with torch.no_grad():
        got, want = adapted(images).masks, base(images).masks
    if peft.get(method).identity_at_init:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        # VPT: the prompts are extra keys/values from the start and take part of every softmax, so the
        # output differs; test_vpt_* below check the attention itself against SAM's.
        assert not torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    built = _build(method)
    model = built.model.eval()
    perturb_trainable(model)
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


@pytest.mark.parametrize("method", METHODS)
def test_adapter_refuses_another_base(method, tmp_path):
    built = _build(method)
    path = tmp_path / "a.safetensors"
    save_adapter(built.model, path, {"sam_type": "tiny", "base_sha256": built.base_sha256, "peft_method": method})
    other = build_model(tiny_config(method, model={"seed": 1}))  # different random base weights
    with pytest.raises(CheckpointError, match="base checkpoint sha256"):
        load_adapter(other.model, path, {"sam_type": "tiny", "base_sha256": other.base_sha256, "peft_method": method})
    with pytest.raises(CheckpointError, match="SAM type 'tiny', but this model has 'vit_b'"):
        load_adapter(built.model, path, {"sam_type": "vit_b"})


def test_adapter_refuses_another_method(tmp_path):
    built = _build("lora")
    path = tmp_path / "a.safetensors"
    save_adapter(built.model, path, {"sam_type": "tiny", "base_sha256": built.base_sha256, "peft_method": "lora"})
    conv = _build("conv_lora")
    with pytest.raises(CheckpointError, match="PEFT method 'lora', but this model has 'conv_lora'"):
        load_adapter(conv.model, path, {"peft_method": "conv_lora"})
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_adapter(conv.model, path)


@pytest.mark.parametrize("method", [m for m in METHODS if peft.get(m).adapts_encoder])
def test_nothing_to_adapt_is_an_error(method):
    cfg = tiny_config(method)
    with pytest.raises(ConfigError, match=f"PEFT method {method}: "):
        peft.get(method).apply(torch.nn.Module(), cfg.method_cfg)


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


MERGED = {"lora": 2, "hf": 2, "ssf": 12, "bitfit": 0, "full": 0, "decoder_only": 0}  # wrappers folded in the tiny model


def test_the_mergeable_methods():
    assert {m for m in METHODS if peft.get(m).mergeable} == set(MERGED)


@pytest.mark.parametrize("method", sorted(MERGED))
def test_merge_equals_unmerged(method):
    built = _build(method)
    model = built.model.eval()
    perturb_trainable(model)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        before = model(images).masks
        assert peft.get(method).merge(model.image_encoder) == MERGED[method]
        after = model(images).masks
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not any(is_wrapper(m) for m in model.modules())
    plain = build_model(tiny_config("decoder_only")).model.image_encoder  # SAM's own encoder
    merged_state = model.image_encoder.state_dict()
    assert {k: v.shape for k, v in merged_state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(merged_state, strict=True)


def test_bitfit_trains_exactly_the_encoders_biases():
    encoder = _build("bitfit").model.image_encoder
    biases = {f"{mod}.{p}" for mod, m in encoder.named_modules() for p, _ in m.named_parameters(recurse=False)
              if p == "bias"}
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == biases and len(biases) == 15  # 2 blocks x (qkv, proj, lin1, lin2, 2 norms) + patch + 2 neck norms
    assert not any(isinstance(m, AdapterLayer) for m in encoder.modules())


def test_full_trains_the_whole_encoder_only():
    model = _build("full").model
    assert all(p.requires_grad for p in model.image_encoder.parameters())
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())


@pytest.mark.parametrize("section, message", [
    ({"adapter": {"positions": ["mlp", "ffn"]}}, "peft.adapter.positions: unknown \\['ffn'\\]"),
    ({"adapter": {"positions": []}}, "peft.adapter.positions: empty"),
    ({"adapter": {"bottleneck": 0}}, "peft.adapter.bottleneck: 0 is below the minimum 1"),
    ({"ssf": {"targets": ["qkv", "norm3"]}}, "peft.ssf.targets: unknown \\['norm3'\\]"),
    ({"vpt": {"num_tokens": 0}}, "peft.vpt.num_tokens: 0 is below the minimum 1"),
    ({"vpt": {"dropout": 1.0}}, "peft.vpt.dropout: 1.0 must be below 1"),
    ({"sam_adapter": {"freq_ratio": 1.5}}, "peft.sam_adapter.freq_ratio: 1.5 must be below 1"),
])
def test_method_options_are_checked(section, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("adapter", peft=section)


def test_sam_adapter_scale_factor_larger_than_the_width():
    with pytest.raises(ConfigError, match="peft.sam_adapter.scale_factor: 64 is larger than the encoder width 32"):
        _build("sam_adapter", peft={"method": "sam_adapter", "sam_adapter": {"scale_factor": 64}})
