import contextlib
import copy

import pytest
import torch
from segment_anything.modeling import MaskDecoder

from samft.config import ModelConfig, TinyConfig
from samft.errors import CheckpointError
from samft.model import build_model, count_params
from samft.model.sam import build_sam, build_tiny, interpolate_pos_embed, load_checkpoint, set_image_size
from samft.model.semantic import SemanticSAM, logits_to_original

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    model = build_model(tiny_config("decoder_only")).model.eval()
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(tiny_model, batch):
    out = tiny_model(torch.randn(batch, 3, 64, 64))
    assert out.masks.shape == (batch, 1, 16, 16)
    assert out.class_logits is None
    assert out.aux_loss.shape == ()


@pytest.mark.parametrize("hw", [(64, 96), (96, 48), (128, 128)])
def test_non_square_and_other_sizes(tiny_model, hw):
    out = tiny_model(torch.randn(2, 3, *hw))
    assert out.masks.shape == (2, 1, hw[0] // 4, hw[1] // 4)
    assert torch.isfinite(out.masks).all()


def test_batched_decoding_matches_sams_own_decoder(tiny_model):
    """Our batch routine against segment_anything's predict_masks run one image at a time."""
    dec = tiny_model.decoder
    ref = MaskDecoder(transformer_dim=32, transformer=dec.transformer, num_multimask_outputs=0,
                      iou_head_hidden_dim=32)
    with torch.no_grad():
        ref.iou_token.weight.copy_(dec.iou_token.weight)
        ref.mask_tokens.weight.copy_(dec.mask_tokens.weight)
        ref.output_upscaling = dec.output_upscaling
        ref.output_hypernetworks_mlps[0] = dec.hypernetwork
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = tiny_model(images).masks
        pe = tiny_model.prompt_encoder
        for i in range(3):
            emb = tiny_model.encode(images[i : i + 1])
            sparse, dense = pe(points=None, boxes=None, masks=None)
            masks, _ = ref.predict_masks(emb, pe.get_dense_pe(), sparse, dense)
            torch.testing.assert_close(ours[i : i + 1], masks, rtol=1e-5, atol=1e-5)


def test_batch_equals_single_images(tiny_model):
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = tiny_model(images).masks
        single = torch.cat([tiny_model(images[i : i + 1]).masks for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_mask_token_and_hypernetwork_start_from_sams_token_0():
    cfg = tiny_config("decoder_only")
    sam = build_sam(cfg.model)
    model = SemanticSAM(copy.deepcopy(sam), num_queries=4, num_classes=3)
    for q in range(4):
        torch.testing.assert_close(model.decoder.mask_tokens.weight[q], sam.mask_decoder.mask_tokens.weight[0])
    for a, b in zip(model.decoder.hypernetwork.parameters(), sam.mask_decoder.output_hypernetworks_mlps[0].parameters()):
        torch.testing.assert_close(a, b)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.masks.shape == (2, 4, 16, 16) and out.class_logits.shape == (2, 4, 4)


def test_random_base_is_reproducible_from_the_seed():
    a = build_sam(ModelConfig(type="tiny", img_size=64, tiny=TinyConfig(embed_dim=32, out_chans=32, decoder_heads=2)))
    b = build_sam(ModelConfig(type="tiny", img_size=64, tiny=TinyConfig(embed_dim=32, out_chans=32, decoder_heads=2)))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_logits_to_original_crops_padding_then_resizes():
    logits = torch.zeros(1, 16, 16)
    logits[:, :12, :] = 5.0  # valid region is the top 48 of 64 rows
    out = logits_to_original(logits, 64, (48, 64), (30, 40))
    assert out.shape == (1, 30, 40)
    assert (out > 0).all()


def test_pos_embed_interpolation_for_other_input_sizes():
    cfg = ModelConfig(type="vit_b", img_size=512)
    sam = build_sam(cfg, meta=True)
    assert sam.image_encoder.pos_embed.shape == (1, 32, 32, 768)
    assert sam.prompt_encoder.image_embedding_size == (32, 32)
    pos = torch.randn(1, 4, 4, 8)
    same = interpolate_pos_embed(pos, (4, 4))
    assert same is pos
    assert interpolate_pos_embed(pos, (8, 6)).shape == (1, 8, 6, 8)


def test_vit_b_at_256_runs_end_to_end():
    cfg = tiny_config("conv_lora", model={"type": "vit_b", "img_size": 256})
    model = build_model(cfg).model.eval()
    assert model.image_encoder.pos_embed.shape == (1, 16, 16, 768)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.masks.shape == (1, 1, 64, 64)
    assert count_params(model)["trainable_params"] == 3_624_768


@pytest.mark.parametrize("sam_type, method, expected", [
    ("vit_h", "conv_lora", 4_020_096),
    ("vit_h", "lora", 3_997_056),
    ("vit_h", "decoder_only", 3_505_536),
    ("vit_b", "conv_lora", 3_624_768),
])
def test_paper_trainable_parameter_counts(sam_type, method, expected):
    cfg = tiny_config(method, model={"type": sam_type, "img_size": 1024})
    assert count_params(build_model(cfg, meta=True).model)["trainable_params"] == expected


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = tiny_config("decoder_only")
    sam = build_tiny(cfg.model)
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    other = build_tiny(cfg.model)
    load_checkpoint(other, path, "tiny")
    for a, b in zip(sam.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)

    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(other, tmp_path / "missing.pth", "tiny")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(other, junk, "tiny")
    partial = tmp_path / "partial.pth"
    state = sam.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=r"1 missing keys \['mask_decoder.iou_token.weight'\]"):
        load_checkpoint(other, partial, "tiny")


def test_checkpoint_of_another_sam_type_is_named(tmp_path):
    """A vit_l file given for vit_b: the error says which type the file is."""
    fake = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1024)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(fake, path)
    sam = build_sam(ModelConfig(type="vit_b", img_size=1024), meta=True)
    with pytest.raises(CheckpointError, match=r"this is a vit_l checkpoint \(encoder width 1024, 24 blocks\) but "
                                              r"model.type is vit_b"):
        load_checkpoint(sam, path, "vit_b")


def test_set_image_size_updates_prompt_encoder():
    sam = build_sam(ModelConfig(type="vit_b"), meta=True)
    set_image_size(sam, 320)
    assert sam.image_encoder.img_size == 320
    assert sam.prompt_encoder.input_image_size == (320, 320)
    assert sam.image_encoder.pos_embed.shape[1:3] == (20, 20)


def test_a_checkpoint_named_for_another_size_is_flagged_and_a_missing_one_says_how_to_try_without(tmp_path):
    """The example configs: model.type tiny with a sam_vit_b checkpoint is flagged by info; a missing checkpoint
    fails before the data check, saying how to run without one."""
    from samft.config import config_from_dict
    from samft.engine.train.loop import train
    from samft.errors import ConfigError
    from samft.model import checkpoint_mismatch, describe

    assert "model.type=vit_b" in checkpoint_mismatch("tiny", "/w/sam_vit_b_01ec64.pth")
    assert checkpoint_mismatch("vit_b", "/w/sam_vit_b_01ec64.pth") is None
    assert checkpoint_mismatch("tiny", None) is None
    cfg = config_from_dict({"model": {"type": "tiny", "img_size": 64, "checkpoint": str(tmp_path / "sam_vit_b.pth")}})
    assert "vit_b" in describe(cfg)["checkpoint_note"]
    cfg = config_from_dict({"model": {"type": "tiny", "img_size": 64, "checkpoint": str(tmp_path / "nowhere.pth")},
                            "data": {"root": str(tmp_path / "no_data")}, "output": {"dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=r"model\.checkpoint: file not found: .*model\.type=tiny model\.checkpoint=null"):
        train(cfg, show_progress=False)


def test_a_build_from_a_checkpoint_skips_the_random_init_and_equals_the_initialised_build(tmp_path, monkeypatch):
    """With model.checkpoint set, the structure is built without filling its weights (weights_left_unfilled):
    every parameter and buffer (the unsaved pixel_mean/std included) and the forward equal those of a build that
    initialised first; random weights (no checkpoint) are filled; torch.nn.init's functions are back afterwards,
    after an error inside too."""
    import samft.model.sam as sam_module

    cfg = tiny_config("decoder_only").model
    saved = build_tiny(ModelConfig(**{**cfg.__dict__, "seed": 7}))
    path = tmp_path / "base.pth"
    torch.save(saved.state_dict(), path)
    with_ckpt = ModelConfig(**{**cfg.__dict__, "checkpoint": str(path)})
    real_kaiming = torch.nn.init.kaiming_uniform_
    calls = []

    def counted(t, *a, **k):
        calls.append(t)
        return real_kaiming(t, *a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counted)
    originals = {name: getattr(torch.nn.init, name) for name in sam_module.INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    build_sam(cfg)
    assert calls  # random weights (no checkpoint) are filled
    calls.clear()
    fast = build_sam(with_ckpt)
    assert calls == []  # no Linear/Conv filled its weight
    assert all(getattr(torch.nn.init, n) is fn for n, fn in originals.items())
    monkeypatch.setattr(sam_module, "weights_left_unfilled", contextlib.nullcontext)
    plain = build_sam(with_ckpt)
    assert calls  # the initialised build filled them
    for (name, a), (_, b) in zip([*fast.named_parameters(), *fast.named_buffers()],
                                 [*plain.named_parameters(), *plain.named_buffers()]):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert torch.equal(fast.image_encoder(x), plain.image_encoder(x))
    monkeypatch.undo()
    before = {name: getattr(torch.nn.init, name) for name in sam_module.INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    with pytest.raises(RuntimeError, match="inside"):
        with sam_module.weights_left_unfilled():
            assert torch.nn.init.normal_(torch.zeros(3)).eq(0).all()  # left as it is
            raise RuntimeError("an error inside")
    assert all(getattr(torch.nn.init, n) is fn for n, fn in before.items())
    assert torch.nn.init.kaiming_uniform_ is real_kaiming


def test_a_loaded_checkpoints_tensors_become_the_models_and_the_file_is_never_written(tmp_path):
    """load_checkpoint assigns the tensors it read: the weights equal the file's, frozen flags and dtypes are the
    model's, and writing into the model's weights in place (as merging adapters does) leaves the user's file
    byte for byte."""
    import hashlib

    cfg = tiny_config("decoder_only")
    saved = build_tiny(cfg.model)
    path = tmp_path / "base.pth"
    torch.save(saved.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = build_tiny(cfg.model)
    model.image_encoder.requires_grad_(False)
    load_checkpoint(model, path, "tiny")
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert torch.equal(torch.load(path, weights_only=True)["image_encoder.pos_embed"],
                       saved.state_dict()["image_encoder.pos_embed"])
