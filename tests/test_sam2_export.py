"""``samft export --merged`` of a SAM 2.1 run: a checkpoint in the official layout (key ``model``, SAM2Base's
names) that sam2's own classes load strictly, plus the head file; reading it back gives the run's outputs."""

from __future__ import annotations

import pytest
import torch

from samft import peft
from samft.engine.artifacts.export import export_run, head_path, load_exported
from samft.model import build_model
from samft.model.hiera import build_sam2_base

from conftest import tiny_config
from test_export import TOLERANCE, _outputs, make_run

SAM2 = {"family": "sam2", "type": "tiny", "img_size": 64}
MERGEABLE = sorted(m for m in peft.all_methods() if peft.get(m).mergeable)


def _sam2_base(model_cfg) -> torch.nn.Module:
    """A whole SAM2Base of the run's size from sam2's classes (memory attention, memory encoder, object
    pointers): what a merged export must load into strictly."""
    return build_sam2_base(model_cfg)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_sam2_export_loads_strictly_and_gives_the_runs_outputs(method, tmp_path):
    run, model = make_run(tmp_path / "run", method, model=SAM2)
    out = tmp_path / "model.pth"
    result = export_run(run, out)
    assert result.merged and result.files == [out, head_path(out)]
    assert "SAM 2.1 checkpoint, key 'model'" in result.message() and "random (the run has no base" in result.message()
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model"}
    base = _sam2_base(tiny_config(method, model=SAM2).model)
    base.load_state_dict(saved["model"], strict=True)  # every SAM2Base key, each with its shape
    images = torch.randn(2, 3, 64, 96)
    want = _outputs(model, images)
    exported = load_exported(out)
    torch.testing.assert_close(_outputs(exported, images), want, **TOLERANCE)
    assert not any(p.requires_grad for p in exported.parameters())
    # sam2's own image encoder on the exported weights computes the run's adapted encoder
    with torch.no_grad():
        got = base.eval().image_encoder(images[:1])["backbone_fpn"]
        _, levels = model.eval().encode_levels(images[:1])
    torch.testing.assert_close(got[0], levels[0], **TOLERANCE)


def test_merged_sam2_export_of_a_multiclass_run_is_a_base_for_a_new_run(tmp_path):
    """Several mask tokens and a class head (in the head file); the merged file as model.checkpoint."""
    run, model = make_run(tmp_path / "run", "lora", model={**SAM2, "num_mask_tokens": 3},
                          data={"classes": ["bg", "a", "b"]})
    out = tmp_path / "mc.pth"
    export_run(run, out)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = load_exported(out)(images), model.eval()(images)
    torch.testing.assert_close(got.masks, want.masks, **TOLERANCE)
    torch.testing.assert_close(got.class_logits, want.class_logits, **TOLERANCE)
    fresh = build_model(tiny_config("lora", model={**SAM2, "checkpoint": str(out)}))
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.eval().encode(images), model.encode(images), **TOLERANCE)


def test_video_only_parts_come_from_the_base_checkpoint(tmp_path):
    """A run on a base checkpoint in the official layout: its merged export carries the base's memory
    attention, memory encoder and object-pointer weights unchanged."""
    cfg = tiny_config("lora", model=SAM2)
    whole = _sam2_base(cfg.model)
    torch.save({"model": whole.state_dict()}, tmp_path / "base.pt")
    run, _ = make_run(tmp_path / "run", "lora", model={**SAM2, "checkpoint": str(tmp_path / "base.pt")})
    result = export_run(run, tmp_path / "m.pth")
    assert "video-only parts copied from the base checkpoint" in result.message()
    saved = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
    for k, v in whole.state_dict().items():
        if k.startswith(("memory_attention.", "memory_encoder.", "obj_ptr_proj.")):
            assert torch.equal(saved[k], v), k
    assert not torch.equal(saved["image_encoder.trunk.blocks.0.attn.qkv.weight"],
                           whole.state_dict()["image_encoder.trunk.blocks.0.attn.qkv.weight"])  # LoRA folded in


def test_merged_hiera_t_export_loads_with_sam2s_build_sam2(tmp_path):
    """An official size (hiera_t, random weights, at 128 px): sam2.build_sam.build_sam2 with the package's own
    SAM 2.1 config loads the merged file strictly (it raises on a missing or unexpected key)."""
    from sam2.build_sam import build_sam2

    run, _ = make_run(tmp_path / "run", "bitfit", model={"family": "sam2", "type": "hiera_t", "img_size": 128,
                                                          "checkpoint": None})
    out = tmp_path / "hiera_t.pth"
    export_run(run, out)
    sam2 = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=str(out), device="cpu")
    saved = torch.load(out, weights_only=True)["model"]
    assert torch.equal(sam2.image_encoder.trunk.blocks[0].attn.qkv.bias, saved["image_encoder.trunk.blocks.0.attn.qkv.bias"])
