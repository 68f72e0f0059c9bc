"""model.decoder: full (every decoder weight trains), frozen, peft (LoRA on the decoder's q_proj/v_proj)."""

from __future__ import annotations

import pytest
import torch

from samft.config import config_from_dict, config_hash, to_dict, validate
from samft.errors import ConfigError
from samft.model import build_model, describe
from samft.peft.decoder import merge_decoder
from samft.peft.lora import LoRALinear

from conftest import perturb_trainable, tiny_config


def _model(decoder, method="lora", **sections):
    return build_model(tiny_config(method, model={"decoder": decoder}, **sections)).model


def _decoder_trainable(model):
    return {n for n, p in model.decoder.named_parameters() if p.requires_grad}


def test_the_default_is_todays_decoder_and_hash():
    model = _model("full")
    assert _decoder_trainable(model) == {n for n, _ in model.decoder.named_parameters()}
    default = config_from_dict({})
    assert not {"decoder", "decoder_rank", "decoder_alpha"} & set(to_dict(default)["model"])
    assert config_hash(config_from_dict({"model": {"decoder": "full"}})) == config_hash(default)


def test_frozen_trains_only_what_samft_adds():
    assert _decoder_trainable(_model("frozen")) == set()
    multi = _model("frozen", data={"classes": ["bg", "a", "b"]}, train={"metric": "miou"})
    assert _decoder_trainable(multi) == {"mask_tokens.weight", "class_head.weight", "class_head.bias"}


def test_frozen_decoder_with_a_frozen_encoder_is_refused():
    with pytest.raises(ConfigError, match="^model.decoder: frozen with peft.method=decoder_only trains nothing"):
        validate(tiny_config("decoder_only", model={"decoder": "frozen"}))


def test_peft_puts_lora_on_the_decoders_attention_and_starts_as_sam():
    model, full = _model("peft").eval(), _model("full").eval()
    wrapped = [n for n, m in model.decoder.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj") for n in wrapped)
    assert len(wrapped) == 2 * (3 * 2 + 1)  # 2 layers x 3 attentions + the final one, q and v each
    assert _decoder_trainable(model) == {f"{n}.lora_{p}" for n in wrapped for p in "AB"}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "base_layer" not in k},
                             strict=False)
        torch.testing.assert_close(model(images).masks, full(images).masks)
    assert describe(tiny_config("lora", model={"decoder": "peft"}))["decoder"] == "peft"


def test_peft_decoder_learns_and_merges_into_plain_linears():
    model = _model("peft").train()
    base = {n: p.detach().clone() for n, p in model.decoder.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    perturb_trainable(model)
    images = torch.randn(2, 3, 64, 64)
    model(images).masks.square().mean().backward()
    assert all(model.decoder.get_parameter(n).grad is None for n in base)
    opt.step()
    assert all(torch.equal(model.decoder.get_parameter(n), v) for n, v in base.items())
    model.eval()
    with torch.no_grad():
        before = model(images).masks
        assert merge_decoder(model.decoder) == 14
        after = model(images).masks
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    plain = _model("full").decoder.state_dict()
    assert set(model.decoder.state_dict()) == set(plain)
