"""peft.method=hf: HF peft's methods as a samft method family, held to samft's own LoRA and to every invariant of
the other methods (placement, save/load, merge, meta counts, checkpointing, bf16, resume, exports)."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("peft")

from samft import peft as registry  # noqa: E402
from samft.config.names import HF_PEFT_TYPES  # noqa: E402
from samft.engine.artifacts.adapter import adapter_expectations, load_adapter, read_adapter, save_adapter  # noqa: E402
from samft.engine.artifacts.export import export_run, load_exported  # noqa: E402
from samft.engine.train.loop import TrainingInterrupted, train  # noqa: E402
from samft.errors import ConfigError  # noqa: E402
from samft.model import build_model, count_params  # noqa: E402
from samft.model.sam import build_tiny  # noqa: E402
from samft.peft.hf import tuner_layers  # noqa: E402
from samft.peft.inject import is_wrapper  # noqa: E402

from conftest import check_checkpointing_and_bf16, interrupt_after, perturb_trainable, tiny_config  # noqa: E402
from test_export import make_run  # noqa: E402

SMALL = {"fourierft": {"n_frequency": 16}}  # peft's default (1000 frequencies) exceeds the tiny layers


def _hf(hf_type="lora", options=None, targets=("qkv",), **sections):
    hf = {"type": hf_type, "targets": list(targets), "options": options if options is not None else
          SMALL.get(hf_type, {})}
    peft = {"method": "hf", "hf": hf, **sections.pop("peft", {})}
    return tiny_config("hf", peft=peft, **sections)


def _ours_key(key):
    """samft lora's name of an HF LoRA tensor (``qkv.lora_A.default.weight`` -> ``qkv.lora_A``)."""
    for part in ("lora_A", "lora_B"):
        key = key.replace(f"{part}.default.weight", part)
    return key.replace("lora_magnitude_vector.default.weight", "magnitude")


@pytest.mark.parametrize("variant, hf_type, options", [("lora", "lora", {}), ("rslora", "lora", {"use_rslora": True}),
                                                        ("dora", "dora", {})])
def test_hf_lora_equals_samft_lora_fp64(variant, hf_type, options):
    """Same rank, alpha and (copied) weights: forward and every gradient equal to 1e-10 in float64."""
    ours = build_model(tiny_config("lora", peft={"method": "lora", "lora": {"rank": 3, "alpha": 5.0, "variant": variant,
                                                                             "targets": ["qkv", "lin2"]}}))
    theirs = build_model(_hf(hf_type, {"r": 3, "lora_alpha": 5.0, **options}, targets=("qkv", "lin2")))
    ours, theirs = ours.model.image_encoder.double(), theirs.model.image_encoder.double()  # where the methods act
    perturb_trainable(theirs)
    state = {_ours_key(k): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outs = []
    for model in (ours.train(), theirs.train()):
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    grads = {_ours_key(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == grads.keys() and len([n for n in mine if "lora_B" in n]) == 4
    for name, g in grads.items():
        torch.testing.assert_close(mine[name], g, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("hf_type", HF_PEFT_TYPES)
def test_every_type_trains_saves_loads_and_merges(hf_type, tmp_path):
    cfg = _hf(hf_type, targets=("qkv", "lin1"))
    built = build_model(cfg)
    model = built.model
    assert built.adapted == tuner_layers(model.image_encoder) and len(built.adapted) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    assert all(".base_layer." not in n for n in trainable)
    # the meta-device structure (samft info, the method table) counts what a real build holds
    assert count_params(build_model(cfg, meta=True).model) == count_params(model)
    perturb_trainable(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, adapter_expectations(cfg, built.base_sha256, model))
    other = build_model(cfg).model
    load_adapter(other, path, adapter_expectations(cfg, built.base_sha256, other))
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        want = model.eval()(images).masks
        torch.testing.assert_close(other.eval()(images).masks, want, rtol=0, atol=0)
        assert registry.get("hf").merge(model.image_encoder) == 4
        torch.testing.assert_close(model(images).masks, want, rtol=1e-4, atol=1e-4)
    assert not any(is_wrapper(m) for m in model.modules())
    plain = build_model(tiny_config("decoder_only")).model.image_encoder
    plain.load_state_dict(model.image_encoder.state_dict(), strict=True)


@pytest.mark.parametrize("hf_type", ["lora", "loha", "oft"])
def test_placement_late_blocks_only(hf_type):
    built = build_model(_hf(hf_type, peft={"blocks": "late:1"}))
    assert built.adapted == ["blocks.1.attn.qkv"] and built.placement == "1 of 2"
    encoder = built.model.image_encoder
    assert not any(is_wrapper(m) for m in encoder.blocks[0].modules())
    assert not any(p.requires_grad for p in encoder.blocks[0].parameters())


@pytest.mark.parametrize("hf_type", ["lora", "loha", "boft"])
def test_checkpointing_and_bf16(hf_type):
    model = perturb_trainable(build_model(_hf(hf_type)).model.train())
    check_checkpointing_and_bf16(model, torch.randn(2, 3, 64, 48))
    assert all(p.dtype == torch.float32 for p in model.image_encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("options, message", [
    ({"lora_alpah": 4}, r"peft.hf.options.lora_alpah: not an option of peft's LoraConfig \(peft.hf.type=lora\) "
                        r"\(did you mean 'lora_alpha'\?\)"),
    ({"r": 0}, r"peft.hf.options \(peft.hf.type=lora\): peft"),
    ({"use_dora": False}, "peft.hf.options.use_dora: peft.hf.type=dora sets it"),
])
def test_bad_options_are_one_line(options, message):
    hf_type = "dora" if "use_dora" in options else "lora"
    with pytest.raises(ConfigError, match=message) as info:
        build_model(_hf(hf_type, options))
    assert "\n" not in str(info.value)


def test_reserved_options_and_unknown_type_are_config_errors():
    with pytest.raises(ConfigError, match=r"peft.hf.options.target_modules: samft sets it"):
        _hf("lora", {"target_modules": ["qkv"]})
    with pytest.raises(ConfigError, match="peft.hf.type"):
        _hf("vera")


def test_without_peft_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'samft\[peft\]'"):
        build_model(_hf("lora"))


def test_merged_export_of_loha_is_plain_sam(tmp_path):
    run, run_model = make_run(tmp_path / "run", "hf", peft={"method": "hf", "hf": {"type": "loha"}})
    out = tmp_path / "model.pth"
    assert export_run(run, out).merged
    sam = build_tiny(tiny_config("lora").model)
    sam.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(images), run_model.eval().encode(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_exported(out)(images).masks, run_model(images).masks, rtol=1e-5, atol=1e-5)


def test_onnx_export_of_loha(tmp_path):
    pytest.importorskip("onnxruntime")
    from samft.engine.artifacts.onnx_export import export_onnx

    run, _ = make_run(tmp_path / "run", "hf", peft={"method": "hf", "hf": {"type": "loha"}})
    result = export_onnx(run, tmp_path / "model.onnx", dynamic_batch=True)
    assert all(d <= 1e-4 for d in result.checks.values()), result.checks


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, synthetic_dir, monkeypatch):
    def cfg(name):
        opts = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 0, "progress": False,
                "device": "cpu", "seed": 5}
        return _hf("loha", data={"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25}, train=opts,
                   output={"dir": str(tmp_path / name)})

    straight = train(cfg("straight"), show_progress=False)
    interrupt_after(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        train(cfg("resumed"), show_progress=False)
    monkeypatch.undo()
    train(cfg("resumed"), resume=True, show_progress=False)
    a, _ = read_adapter(straight / "adapter_last.safetensors")
    b, _ = read_adapter(tmp_path / "resumed" / "adapter_last.safetensors")
    assert a.keys() == b.keys() and any("hada_w1_a" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_info_names_the_type_and_counts_it(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from samft.cli import app
    from conftest import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY, "peft": {"method": "hf", "hf": {"type": "lokr", "targets": ["lin1"]}}}))
    result = CliRunner().invoke(app, ["info", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "peft.hf.type lokr (of lora, dora, loha" in text and "adapted 2: blocks.0.mlp.lin1 ... blocks.1.mlp.lin1" in text
    built = build_model(_hf("lokr", targets=("lin1",)))
    assert f"adapters {count_params(built.model)['adapter_params']:,}" in text


def test_options_from_command_line_overrides_keep_their_yaml_types():
    from samft.config import config_from_dict
    from conftest import TINY

    cfg = config_from_dict({"model": TINY, "peft": {"method": "hf"}},
                           ["peft.hf.type=lokr", "peft.hf.options.r=4", "peft.hf.options.alpha=2.5",
                            "peft.hf.options.decompose_both=true", "peft.hf.options.rank_pattern={blocks.1.attn.qkv: 2}"])
    assert cfg.peft.hf.options == {"r": 4, "alpha": 2.5, "decompose_both": True, "rank_pattern": {"blocks.1.attn.qkv": 2}}
    with pytest.raises(ConfigError, match=r"peft.hf.options: expected mapping of value"):
        config_from_dict({"model": TINY, "peft": {"method": "hf", "hf": {"options": [1, 2]}}})
