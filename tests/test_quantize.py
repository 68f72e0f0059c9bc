"""model.quantize (QLoRA): the frozen encoder's linears in NF4 / int8 through bitsandbytes, adapters on top; trains
on the CPU (bitsandbytes' CPU backend), saves and loads, exports de-quantised."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

from samft.engine.artifacts.adapter import read_adapter  # noqa: E402
from samft.engine.artifacts.export import export_run, load_exported  # noqa: E402
from samft.engine.artifacts.loading import load_run  # noqa: E402
from samft.engine.train.loop import train  # noqa: E402
from samft.errors import ConfigError  # noqa: E402
from samft.model import build_model  # noqa: E402
from samft.model.sam import build_tiny  # noqa: E402
from samft.peft.quantize import dense_weight, dequantize_encoder, is_quantized, quantized_linear  # noqa: E402

from conftest import check_checkpointing_and_bf16, perturb_trainable, tiny_config  # noqa: E402
from test_export import make_run  # noqa: E402

KINDS = ["nf4", "int8"]


@pytest.mark.parametrize("kind, error", [("nf4", 0.16), ("int8", 0.5 / 127 + 1e-3)])  # of the row's largest |w|:
# nf4: half the widest gap of its 16 levels (0.72 to 1) with double-quantised scales (a row is one 64-value block)
def test_quantised_linear_computes_with_its_dense_weight(kind, error):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96).requires_grad_(False)
    q = quantized_linear(linear, kind)
    assert is_quantized(q) and q.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)
    x = torch.randn(2, 3, 5, 64)
    torch.testing.assert_close(q(x), F.linear(x, dense_weight(q), q.bias), rtol=0, atol=1e-5)
    row_max = linear.weight.abs().amax(dim=1, keepdim=True)  # int8: half a step of 1/127 (+ the fp16 cast)
    assert ((dense_weight(q) - linear.weight).abs() <= error * row_max).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, options", [("lora", {}), ("lora", {"variant": "dora"}), ("conv_lora", {})])
def test_adapters_wrap_the_quantised_base_and_train(kind, method, options):
    model = build_model(tiny_config(method, model={"quantize": kind}, peft={"method": method, method: options})).model
    encoder = model.image_encoder
    assert all(is_quantized(encoder.get_submodule(f"blocks.{i}.{n}")) for i in range(2) for n in ("attn.proj", "mlp.lin1"))
    assert all(is_quantized(encoder.get_submodule(f"blocks.{i}.attn.qkv.base_layer")) for i in range(2))
    frozen = {n: t.clone() for n, t in encoder.state_dict().items() if "base_layer" in n or "mlp" in n}
    perturb_trainable(model.train())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.randn(2, 3, 64, 64))
    (out.masks.square().mean() + out.aux_loss).backward()
    grads = [p.grad for n, p in encoder.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    after = encoder.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items() if torch.is_tensor(t))  # the base stays


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantised_run_trains_reloads_and_exports_merged_de_quantised(kind, tmp_path, synthetic_dir):
    cfg = tiny_config("lora", model={"quantize": kind}, data={"root": str(synthetic_dir), "train": ".",
                                                              "val_fraction": 0.25},
                      train={"epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 1e-2, "save_every": 0,
                             "progress": False, "device": "cpu"}, output={"dir": str(tmp_path / "run")})
    run = train(cfg, show_progress=False)
    tensors, _ = read_adapter(run / "adapter_last.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert all("base_layer" not in k for k in tensors)  # the quantised base is never saved
    loaded = load_run(run, torch.device("cpu"), "adapter_last.safetensors").model.eval()
    assert is_quantized(loaded.image_encoder.blocks[0].attn.qkv.base_layer)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = loaded.encode(images)
        masks = loaded(images).masks
    out = tmp_path / "model.pth"
    assert export_run(run, out, adapter="adapter_last.safetensors").merged
    sam = build_tiny(tiny_config("lora").model)
    state = torch.load(out, weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    sam.load_state_dict(state, strict=True)  # plain SAM: the de-quantised base + the folded LoRA
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(images), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_exported(out)(images).masks, masks, rtol=1e-5, atol=1e-5)


def test_unmerged_export_of_quantised_conv_lora_holds_float_weights(tmp_path):
    run, model = make_run(tmp_path / "run", "conv_lora", model={"quantize": "nf4"})
    out = tmp_path / "model.pth"
    result = export_run(run, out)
    assert not result.merged
    exported = load_exported(out)
    assert not any(is_quantized(m) for m in exported.modules())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(images).masks, model.eval()(images).masks, rtol=1e-5, atol=1e-5)


def test_dequantize_gives_plain_linears_of_the_same_function():
    model = build_model(tiny_config("lora", model={"quantize": "nf4"})).model.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.encode(images)
        assert dequantize_encoder(model.image_encoder) == 8  # qkv, proj, lin1, lin2 of two blocks
        assert not any(is_quantized(m) for m in model.modules())
        torch.testing.assert_close(model.encode(images), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sections, message", [
    ({"peft": {"method": "full"}}, "model.quantize=nf4: peft.method=full is not available on quantised linear weights"),
    ({"peft": {"method": "lora", "lora": {"init": "pissa"}}}, "peft.lora.init=pissa rewrites the frozen weight"),
    ({"peft": {"method": "hf", "hf": {"type": "loha"}}}, "peft.hf.type=loha reads its base layer's weight"),
    ({"peft": {"method": "vpt"}}, "peft.method=vpt is not available on quantised linear weights"),
])
def test_what_cannot_be_quantised_is_one_line(sections, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(sections["peft"]["method"], model={"quantize": "nf4"}, **sections)


def test_without_bitsandbytes_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"pip install 'samft\[quant\]'"):
        build_model(tiny_config("lora", model={"quantize": "nf4"}))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointing_and_bf16_on_the_quantised_base(kind):
    model = perturb_trainable(build_model(tiny_config("lora", model={"quantize": kind})).model.train())
    check_checkpointing_and_bf16(model, torch.randn(2, 3, 64, 48))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bitsandbytes' CUDA kernels)")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_qlora_step_and_de_quantised_weights(kind):
    model = build_model(tiny_config("lora", model={"quantize": kind})).model
    on_cpu = {n: dense_weight(m).clone() for n, m in model.image_encoder.named_modules() if is_quantized(m)}
    model = perturb_trainable(model.cuda().train())
    assert all(torch.equal(dense_weight(model.image_encoder.get_submodule(n)).cpu(), w) for n, w in on_cpu.items())
    out = model(torch.randn(2, 3, 64, 64, device="cuda"))
    out.masks.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hf_type", ["lora", "dora", "ia3", "fourierft", "randlora"])
def test_hf_types_on_a_quantised_base_compute_with_the_de_quantised_weight(hf_type, kind):
    pytest.importorskip("peft")
    import copy

    from samft import peft

    options = {"n_frequency": 16} if hf_type == "fourierft" else {}
    cfg = tiny_config("hf", model={"quantize": kind}, peft={"method": "hf", "hf": {"type": hf_type, "options": options,
                                                                                  "targets": ["qkv", "lin1"]}})
    model = perturb_trainable(build_model(cfg).model.eval())
    assert is_quantized(model.image_encoder.blocks[0].attn.qkv.get_base_layer())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.encode(images)
        plain = copy.deepcopy(model)
        dequantize_encoder(plain.image_encoder)
        torch.testing.assert_close(plain.encode(images), want, rtol=0, atol=1e-5)
        assert peft.get("hf").merge(plain.image_encoder) == 4
        torch.testing.assert_close(plain.encode(images), want, rtol=1e-5, atol=1e-5)
    model.train()
    model(images).masks.square().mean().backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters() if p.requires_grad)


def test_onnx_export_of_a_quantised_run_holds_the_de_quantised_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    from samft.engine.artifacts.onnx_export import export_onnx

    run, _ = make_run(tmp_path / "run", "lora", model={"quantize": "nf4"})
    result = export_onnx(run, tmp_path / "model.onnx", dynamic_batch=True)  # checked against the quantised run
    assert all(d <= 1e-4 for d in result.checks.values()), result.checks


def test_info_counts_the_float_structure_and_names_the_quantisation(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from samft.cli import app
    from samft.model import describe
    from conftest import TINY

    assert describe(tiny_config("lora", model={"quantize": "nf4"}))["total_params"] == \
        describe(tiny_config("lora"))["total_params"]
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY, "quantize": "int8"}, "peft": {"method": "lora"}}))
    result = CliRunner().invoke(app, ["info", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "quantize int8: the encoder blocks' linear weights" in " ".join(result.output.split())
