"""SAM 2.1 (model.family=sam2) on a tiny random Hiera: the semantic model against sam2's own classes, and
checkpoint loading in the official layout."""

from __future__ import annotations

import pytest
import torch

from samft.config import config_from_dict
from samft.errors import CheckpointError
from samft.model import build_model

TINY2 = {"family": "sam2", "type": "tiny", "img_size": 64}


def sam2_config(method: str = "lora", **model):
    return config_from_dict({"model": {**TINY2, **model}, "peft": {"method": method},
                             "train": {"device": "cpu", "progress": False}, "data": {"num_workers": 0}})


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A whole SAM2Base (tiny) and its state saved as an official checkpoint ({"model": state})."""
    from samft.model.hiera import build_sam2_base

    torch.manual_seed(1)
    base = build_sam2_base(sam2_config().model).eval()
    with torch.no_grad():  # random, not the constructors' zeros: the test must see every tensor
        for name in ("no_mem_embed", "image_encoder.trunk.pos_embed", "image_encoder.trunk.pos_embed_window"):
            base.get_parameter(name).normal_(0, 0.5)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_tiny.pt"
    torch.save({"model": base.state_dict()}, path)
    return base, path


def test_encoder_features_equal_sam2_image_encoder(official):
    base, path = official
    model = build_model(sam2_config("lora", checkpoint=str(path))).model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = base.image_encoder(images)["backbone_fpn"]
        emb, (s4, s8) = model.encode_levels(images)
    torch.testing.assert_close(s4, ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(s8, ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(emb, ref[2] + base.no_mem_embed.reshape(1, -1, 1, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_binary_logits_equal_sam2_forward_sam_heads_without_prompt(official, attention):
    """SAM2Base's own path for an image with no memory and no prompt (forward_image, no_mem_embed added to
    the stride-16 map, _forward_sam_heads with point_inputs=None), its decoder given one mask token as
    ours (SAM 2's multimask tokens are dropped, as for SAM 1) and an object score kept positive (SAM 2's
    no-object gate is not applied here). Tolerance 1e-5."""
    import copy

    from samft.model.hiera import build_mask_decoder

    base, path = official
    model = build_model(sam2_config("lora", checkpoint=str(path), attention=attention)).model.eval()
    ref = copy.deepcopy(base)
    single = build_mask_decoder(32, num_multimask_outputs=0)
    own = single.state_dict()
    single.load_state_dict({k: v for k, v in base.sam_mask_decoder.state_dict().items()
                            if k in own and v.shape == own[k].shape} | {
        "mask_tokens.weight": base.sam_mask_decoder.mask_tokens.weight[:1],
        "iou_prediction_head.layers.2.weight": own["iou_prediction_head.layers.2.weight"],
        "iou_prediction_head.layers.2.bias": own["iou_prediction_head.layers.2.bias"]})
    with torch.no_grad():
        single.pred_obj_score_head.layers[-1].bias.fill_(1e3)
    ref.sam_mask_decoder = single.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = ref.forward_image(images)
        _, feats, _, sizes = ref._prepare_backbone_features(out)
        feats[-1] = feats[-1] + ref.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(3, -1, *s) for f, s in zip(feats, sizes)]
        low_res = ref._forward_sam_heads(maps[-1], high_res_features=maps[:-1], multimask_output=False)[0]
        ours = model(images).masks
    assert ours.shape == low_res.shape == (3, 1, 16, 16)
    torch.testing.assert_close(ours, low_res, rtol=0, atol=1e-5)


def test_batch_equals_single_images_and_multiclass_shapes():
    model = build_model(sam2_config("conv_lora")).model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        whole = model(images).masks
        for i in range(3):
            torch.testing.assert_close(model(images[i : i + 1]).masks, whole[i : i + 1], rtol=1e-5, atol=1e-5)
    cfg = config_from_dict({"model": TINY2, "data": {"classes": ["a", "b", "c"]}, "peft": {"method": "lora"}})
    out = build_model(cfg).model(torch.randn(2, 3, 64, 64))
    assert out.masks.shape == (2, cfg.model.num_mask_tokens, 16, 16)
    assert out.class_logits.shape == (2, cfg.model.num_mask_tokens, 4)


@pytest.mark.parametrize("size", [32, 96, 128])
def test_other_input_sizes(size):
    model = build_model(sam2_config("lora", img_size=size)).model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).masks.shape == (1, 1, size // 4, size // 4)


def test_only_adapters_and_decoder_train():
    model = build_model(sam2_config("lora")).model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("decoder.") or ".lora_" in n for n in names)
    assert not model.no_mem_embed.requires_grad


def test_checkpoint_errors(official, tmp_path):
    base, path = official
    state = base.state_dict()
    bad = dict(state)
    bad.pop("sam_mask_decoder.iou_token.weight")
    torch.save({"model": bad}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['sam_mask_decoder.iou_token.weight'\]"):
        build_model(sam2_config(checkpoint=str(tmp_path / "missing.pt")))
    torch.save({"model": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['extra.weight'\]"):
        build_model(sam2_config(checkpoint=str(tmp_path / "extra.pt")))
    torch.save(state, tmp_path / "flat.pt")
    with pytest.raises(CheckpointError, match="a dict with key 'model'"):
        build_model(sam2_config(checkpoint=str(tmp_path / "flat.pt")))
    with pytest.raises(CheckpointError, match="this is a SAM 2.1 unknown size .trunk width 16, 5 blocks. checkpoint "
                                              "but model.type is hiera_t"):
        build_model(config_from_dict({"model": {"family": "sam2", "type": "hiera_t", "checkpoint": str(path)}}))
    wide = sam2_config(checkpoint=str(path), tiny_hiera={"embed_dim": 24})
    with pytest.raises(CheckpointError, match=r"has shape \(1, 16, 4, 4\), SAM 2.1 tiny expects \(1, 24, 4, 4\) "
                                              r"\(the file holds SAM 2.1 unknown size \(trunk width 16"):
        build_model(wide)


def test_video_only_keys_are_the_only_ones_left_out(official):
    from samft.model.hiera import VIDEO_ONLY, build_sam2

    base, path = official
    parts = build_sam2(sam2_config(checkpoint=str(path)).model)
    left = set(base.state_dict()) - set(parts.state_dict())
    assert left and all(k.startswith(VIDEO_ONLY) for k in left)
    for k, v in parts.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k], rtol=0, atol=0)
