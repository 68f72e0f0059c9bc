"""peft.blocks: which encoder blocks carry the method (every registered method honours it), the frozen first
blocks run without a graph (equal to the plain path), and the placement travels with the adapter."""

from __future__ import annotations

import pytest
import torch

from samft.config import config_from_dict, config_hash, to_dict, validate
from samft.engine.artifacts.adapter import adapter_expectations, load_adapter, save_adapter
from samft.errors import CheckpointError, ConfigError
from samft.model import build_model, describe
from samft.model.encoder import embed
from samft.model.semantic import SemanticSAM
from samft.peft.inject import AdapterLayer, is_wrapper

from conftest import METHODS, TINY, perturb_trainable, tiny_config

DEEP = {**TINY, "tiny": {**TINY["tiny"], "depth": 3, "global_attn_indexes": [2]}}  # 3 blocks: two frozen


def _built(method, blocks="all", **sections):
    return build_model(tiny_config(method, peft={"method": method, "blocks": blocks}, model=DEEP, **sections))


# ---------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("value, canonical", [("all", "all"), ("late:4", "late:4"), ("late: 04", "late:4"),
                                              ([11, 8, 9], "8,9,11"), ("[3, 1]", "1,3"), (5, "5"), ("2,0", "0,2")])
def test_blocks_spellings(value, canonical):
    assert validate(config_from_dict({"peft": {"blocks": value}})).peft.blocks == canonical


@pytest.mark.parametrize("value, message", [("late:0", "late:K needs a whole number K >= 1"),
                                            ("late:x", "late:K needs"), ("first:2", "is not all, late:K"),
                                            ([1, -2], "is not all, late:K"), ([3, 3], r"block\(s\) \[3\] listed twice")])
def test_bad_blocks_are_one_line_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=f"^peft.blocks: .*{message}") as err:
        validate(config_from_dict({"peft": {"blocks": value}}))
    assert "\n" not in str(err.value)


def test_the_default_placement_leaves_the_config_and_its_hash_as_they_were():
    default = config_from_dict({"peft": {"method": "lora"}})
    assert "blocks" not in to_dict(default)["peft"]
    assert config_hash(config_from_dict({"peft": {"method": "lora", "blocks": "all"}})) == config_hash(default)
    late = config_from_dict({"peft": {"method": "lora", "blocks": "late:2"}})
    assert to_dict(late)["peft"]["blocks"] == "late:2" and config_hash(late) != config_hash(default)


@pytest.mark.parametrize("blocks, message", [("late:4", "late:4 asks for 4 blocks, but tiny has 3 encoder blocks"),
                                             ([0, 3], r"block index 3 is out of range: tiny has 3 encoder blocks \(0..2\)")])
def test_placement_beyond_the_depth_names_it(blocks, message):
    with pytest.raises(ConfigError, match=f"^peft.blocks: {message}$"):
        _built("lora", blocks)


# ---------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_blocks_outside_the_placement_are_frozen_sam(method):
    """late:1 on 3 blocks: blocks 0 and 1 hold no wrapper and no trainable parameter and are bit-identical to the
    frozen SAM's (weights and output, also after a training step); only block 2 (and what the method adds outside
    the blocks) trains."""
    model = _built(method, "late:1").model.train()
    frozen = build_model(tiny_config("decoder_only", model=DEEP)).model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    perturb_trainable(model)
    model(torch.randn(2, 3, 64, 64)).masks.square().mean().backward()
    opt.step()
    x = torch.randn(1, 4, 4, 32)
    for i in (0, 1):
        blk, ref = model.image_encoder.blocks[i], frozen.image_encoder.blocks[i]
        assert type(blk) is type(ref) and not any(is_wrapper(m) for m in blk.modules())
        assert not any(p.requires_grad or p.grad is not None for p in blk.parameters())
        state, want = blk.state_dict(), ref.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        with torch.no_grad():
            assert torch.equal(blk(x), ref(x))
    enc = model.image_encoder
    stem = enc.patch_embed.base_layer if isinstance(enc.patch_embed, AdapterLayer) else enc.patch_embed
    assert not enc.pos_embed.requires_grad and not any(p.requires_grad for p in stem.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_every_block_listed_is_all(method):
    torch.manual_seed(0)
    listed = _built(method, [0, 1, 2]).model
    torch.manual_seed(0)
    every = _built(method).model
    assert [n for n, p in listed.named_parameters() if p.requires_grad] == \
           [n for n, p in every.named_parameters() if p.requires_grad]


def test_the_stem_trains_with_block_0_only():
    trains = lambda blocks: {n for n, p in _built("full", blocks).model.image_encoder.named_parameters()  # noqa: E731
                             if p.requires_grad}
    assert {"pos_embed", "patch_embed.proj.weight"} <= trains([0, 2])
    assert not {"pos_embed", "patch_embed.proj.weight"} & trains([1, 2])
    assert "neck.0.weight" in trains([1, 2])  # after the blocks: the method's own rule


def test_trainable_counts_and_info_reflect_the_placement():
    every, late = (describe(tiny_config("lora", peft={"method": "lora", "blocks": b}, model=DEEP))
                   for b in ("all", "late:1"))
    assert every["peft_blocks"] == "all" and late["peft_blocks"] == "2 of 3"
    assert late["adapter_params"] * 3 == every["adapter_params"] and late["adapted_modules"] == ["blocks.2.attn.qkv"]
    assert describe(tiny_config("lora", peft={"method": "lora", "blocks": "late:2"}, model=DEEP))["peft_blocks"] == \
        "1,2 of 3"


def test_an_adapter_refuses_another_placement(tmp_path):
    cfg = tiny_config("lora", model=DEEP)
    late = _built("lora", "late:1")
    path = tmp_path / "a.safetensors"
    save_adapter(late.model, path, adapter_expectations(cfg, late.base_sha256, late.model))
    every = _built("lora")
    with pytest.raises(CheckpointError, match=r"trained with PEFT placement \(peft.blocks\) '2 of 3', but this model "
                                              r"has 'all'$"):
        load_adapter(every.model, path, adapter_expectations(cfg, every.base_sha256, every.model))
    again = _built("lora", [2])  # the same blocks, spelled otherwise
    load_adapter(again.model, path, adapter_expectations(cfg, again.base_sha256, again.model))


# ---------------------------------------------------------------------------------------------- no graph for frozen blocks


def _loss_and_grads(model, images, plain, monkeypatch):
    if plain:
        monkeypatch.setattr(SemanticSAM, "frozen_prefix", lambda self, x: 0)
    else:
        monkeypatch.undo()
    model.zero_grad()
    torch.manual_seed(3)  # Conv-LoRA's gate noise, dropout
    out = model(images)
    loss = out.masks.square().mean() + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method, blocks, prefix", [(m, "late:1", 3 if m == "decoder_only" else 2) for m in METHODS]
                         + [("lora", [1], 1), ("lora", "all", 0), ("vpt", [0, 2], 0)])
def test_the_frozen_first_blocks_run_without_a_graph_and_change_nothing(method, blocks, prefix, checkpointing,
                                                                        monkeypatch):
    model = perturb_trainable(_built(method, blocks).model.train())
    model.grad_checkpointing = checkpointing
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = embed(model.image_encoder, images)  # SAM-Adapter's generator returns the frozen tokens as they are
    assert model.frozen_prefix(tokens.detach()) == prefix
    fast_loss, fast = _loss_and_grads(model, images, False, monkeypatch)
    plain_loss, plain = _loss_and_grads(model, images, True, monkeypatch)
    assert torch.equal(fast_loss, plain_loss)
    assert fast.keys() == plain.keys() and fast
    for name, g in plain.items():
        torch.testing.assert_close(fast[name], g, rtol=0, atol=0, msg=name)


def test_frozen_prefix_is_zero_without_grad_or_with_an_input_that_needs_one():
    model = _built("lora", "late:1").model.train()
    x = torch.randn(1, 4, 4, 32)
    assert model.frozen_prefix(x) == 2
    assert model.frozen_prefix(x.requires_grad_()) == 0
    with torch.no_grad():
        assert model.frozen_prefix(torch.randn(1, 4, 4, 32)) == 0
