"""``samft export``: merged checkpoints that plain segment_anything loads, unmerged models, equal outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything.build_sam import sam_model_registry

from samft import peft
from samft.config import dump_yaml
from samft.engine.artifacts.adapter import save_adapter, adapter_expectations
from samft.engine.artifacts.export import export_run, head_path, load_exported
from samft.engine.artifacts.rundir import ADAPTER_FILE, CONFIG_FILE
from samft.engine.artifacts.loading import load_run
from samft.errors import CheckpointError, SamftError
from samft.model import build_model
from samft.model.sam import build_tiny

from conftest import METHODS, perturb_trainable, tiny_config

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # merging re-associates float sums: equal up to rounding


def make_run(run_dir: Path, method: str, **sections):
    """A run directory as training leaves it, with trained-looking (perturbed) adapter weights; returns
    (the run directory, the run's model)."""
    cfg = tiny_config(method, **sections)
    built = build_model(cfg)
    perturb_trainable(built.model)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    save_adapter(built.model, run_dir / ADAPTER_FILE, adapter_expectations(cfg, built.base_sha256, built.model))
    return run_dir, built.model


def _outputs(model, images):
    with torch.no_grad():
        return model.eval()(images).masks


@pytest.mark.parametrize("method", METHODS)
def test_export_gives_the_runs_outputs(method, tmp_path):
    run, model = make_run(tmp_path / "run", method)
    out = tmp_path / "export" / "model.pth"
    result = export_run(run, out)
    assert result.merged == peft.get(method).mergeable
    images = torch.randn(2, 3, 64, 80)
    want = _outputs(model, images)
    torch.testing.assert_close(_outputs(load_run(run, torch.device("cpu")).model, images), want)  # the run itself
    exported = load_exported(out)
    torch.testing.assert_close(_outputs(exported, images), want, **TOLERANCE)
    assert not any(p.requires_grad for p in exported.parameters())
    if result.merged:
        assert result.files == [out, head_path(out)] and head_path(out).name == "model.head.safetensors"
        assert "merged" in result.message() or "nothing to fold" in result.message()
    else:
        assert result.files == [out] and not head_path(out).exists()
        assert result.message().startswith(f"{method} cannot be merged")


@pytest.mark.parametrize("method", ["lora", "ssf", "bitfit"])
def test_merged_export_loads_into_plain_segment_anything(method, tmp_path):
    run, run_model = make_run(tmp_path / "run", method)
    out = tmp_path / "model.pth"
    export_run(run, out)
    sam = build_tiny(tiny_config(method).model)  # the classes segment_anything builds, at the tiny size
    sam.load_state_dict(torch.load(out, weights_only=True), strict=True)
    # the plain SAM encoder computes exactly the adapted encoder of the run
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(images), run_model.eval().encode(images), **TOLERANCE)
        # SAM's own prompt-driven path runs on the exported weights
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        masks, iou = sam.mask_decoder(sam.image_encoder(images), sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                      multimask_output=False)
    assert masks.shape == (1, 1, 16, 16) and torch.isfinite(masks).all()


def test_merged_export_of_an_official_size_at_another_input_size(tmp_path):
    """vit_b (random weights) at 128 px: OUT holds SAM's native 64x64 pos_embed, the reload is exact."""
    run, model = make_run(tmp_path / "run", "lora", model={"type": "vit_b", "img_size": 128, "checkpoint": None})
    out = tmp_path / "vit_b.pth"
    export_run(run, out)
    state = torch.load(out, weights_only=True)
    assert state["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    with torch.device("meta"):
        plain = sam_model_registry["vit_b"]()
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in state.items()}
    images = torch.randn(1, 3, 128, 128)
    torch.testing.assert_close(_outputs(load_exported(out), images), _outputs(model, images), **TOLERANCE)


def test_export_errors(tmp_path):
    run, _ = make_run(tmp_path / "run", "lora")
    with pytest.raises(SamftError, match="is a folder"):
        export_run(run, tmp_path)
    with pytest.raises(SamftError, match="not a run directory"):
        export_run(tmp_path / "nothing", tmp_path / "m.pth")
    out = tmp_path / "m.pth"
    export_run(run, out)
    head_path(out).unlink()
    with pytest.raises(CheckpointError, match="needs its decoder head .*m.head.safetensors"):
        load_exported(out)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch file"):
        load_exported(tmp_path / "junk.pth")
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointError, match="neither a merged SAM checkpoint nor an unmerged samft export"):
        load_exported(tmp_path / "dict.pth")


def test_the_merged_checkpoint_is_a_base_for_a_new_run(tmp_path):
    """A merged export is a full SAM checkpoint: model.checkpoint can point at it."""
    run, model = make_run(tmp_path / "run", "ssf")
    out = tmp_path / "ssf.pth"
    export_run(run, out)
    built = build_model(tiny_config("lora", model={"checkpoint": str(out)}))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(built.model.eval().encode(images), model.eval().encode(images), **TOLERANCE)


def test_cli_export(tmp_path):
    from test_cli_e2e import samft

    lora_run, _ = make_run(tmp_path / "runs" / "lora", "lora")
    proc = samft("export", "--run", str(lora_run), "--merged", "out/lora.pth", cwd=tmp_path)
    assert "merged 2 lora layer(s) into the encoder" in proc.stderr
    assert (tmp_path / "out" / "lora.pth").is_file() and (tmp_path / "out" / "lora.head.safetensors").is_file()
    vpt_run, _ = make_run(tmp_path / "runs" / "vpt", "vpt")
    proc = samft("export", "--run", str(vpt_run), "--merged", "vpt.pth", cwd=tmp_path)
    assert proc.stderr.startswith("vpt cannot be merged: its layers cannot be folded into SAM's weights; wrote the "
                                  "unmerged samft model to vpt.pth")
    assert (tmp_path / "vpt.pth").is_file() and not (tmp_path / "vpt.head.safetensors").exists()
    proc = samft("export", "--run", "runs/none", "--merged", "x.pth", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: runs/none: not a run directory (config.yaml not found)"


@pytest.mark.parametrize("method", ["lora", "vpt"])
def test_export_of_a_multiclass_model(method, tmp_path):
    """Several mask tokens and a class head: the head file carries them; outputs and class scores equal."""
    run, model = make_run(tmp_path / "run", method, data={"classes": ["bg", "a", "b"]}, model={"num_mask_tokens": 5})
    out = tmp_path / "mc.pth"
    assert export_run(run, out).merged == (method == "lora")
    images = torch.randn(2, 3, 64, 64)
    exported = load_exported(out).eval()
    with torch.no_grad():
        got, want = exported(images), model.eval()(images)
    assert got.masks.shape == (2, 5, 16, 16) and got.class_logits.shape == (2, 5, 4)  # 3 classes + "no object"
    torch.testing.assert_close(got.masks, want.masks, **TOLERANCE)
    torch.testing.assert_close(got.class_logits, want.class_logits, **TOLERANCE)


def test_cli_eval_of_an_exported_model_prints_the_file_it_wrote(tmp_path, synthetic_dir):
    """``samft eval --run MODEL.pth`` writes MODEL.eval.json next to the model, and says so (it once printed
    MODEL.pth/eval.json, a path that does not exist)."""
    from typer.testing import CliRunner

    from samft.cli import app

    run, _ = make_run(tmp_path / "run", "lora")
    out = tmp_path / "model.pth"
    export_run(run, out)
    result = CliRunner().invoke(app, ["eval", "--run", str(out), "--data", f"all={synthetic_dir}", "--device", "cpu"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    printed = Path(result.output.split("written: ", 1)[1].split()[0])
    assert printed == tmp_path / "model.eval.json" and printed.is_file()
    assert not (tmp_path / "model.pth" / "eval.json").exists()


@pytest.mark.parametrize("method, placement", [("lora", {"decoder": "peft"}), ("conv_lora", {"decoder": "peft"})])
def test_export_of_a_decoder_with_lora_and_a_placement(method, placement, tmp_path):
    """model.decoder=peft: the merged export folds the decoder's LoRA into SAM's decoder (a plain SAM checkpoint),
    the unmerged one keeps it; with peft.blocks=late:1 too; both give the run's outputs."""
    run, model = make_run(tmp_path / "run", method, model=placement, peft={"method": method, "blocks": "late:1"})
    out = tmp_path / "model.pth"
    result = export_run(run, out)
    assert result.merged == peft.get(method).mergeable
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_outputs(load_exported(out), images), _outputs(model, images), **TOLERANCE)
    if result.merged:
        sam = build_tiny(tiny_config(method).model)
        sam.load_state_dict(torch.load(out, weights_only=True), strict=True)
