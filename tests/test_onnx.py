"""``samft export --onnx``: every PEFT method exports and matches PyTorch; the torch-free deployment code
matches samft's own prediction; export-friendly paths equal the normal ones."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from samft.cli import app
from samft.data.io import read_image
from samft.data.layouts import Pair
from samft.data.transforms import SamTransform
from samft.deploy_onnx import OnnxSegmenter, preprocess, resize_bilinear
from samft.engine.infer.evaluate import iter_predictions
from samft.engine.artifacts.onnx_export import check_exportable, export_onnx
from samft.engine.artifacts.loading import load_run
from samft.errors import SamftError
from samft.model.attention.sdpa import SDPAAttention
from samft.peft.conv_lora import ConvLoRAConfig, ConvLoRALinear
from samft.peft.sam_adapter import high_frequency, high_frequency_matmul
from samft.tasks.task import make_task

from conftest import METHODS, ROOT, SHARED_DATA
from test_export import make_run

try:
    import onnx  # noqa: F401
    import onnxruntime as ort
    HAVE_ONNX = True
except ImportError:
    HAVE_ONNX = False
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra is not installed: pip install 'samft[onnx]' "
                                "(scripts/test.sh installs it)")

MULTICLASS = dict(data={"classes": ["bg", "a", "b"]}, model={"num_mask_tokens": 5})
EXACT = 1e-4  # onnxruntime vs PyTorch on the same input (fp32; measured ~3e-7 on the tiny model)
RESIZED = 3e-3  # samft (OpenCV fixed-point resize) vs deploy_onnx (float resize, rounded): one grey level apart
REAL = SHARED_DATA / "em-cells" / "Images" / "0.png"


def real_image():
    return REAL if REAL.is_file() else None  # the random image is always checked


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


@needs_onnx
@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_and_matches(method, task, tmp_path):
    run, _ = make_run(tmp_path / "run", method, **(MULTICLASS if task == "multiclass" else {}))
    out = tmp_path / "model.onnx"
    result = export_onnx(run, out, dynamic_batch=True, image=real_image())
    assert out.is_file() and result.bytes == out.stat().st_size
    assert len(result.checks) == (2 if real_image() else 1)
    assert all(d <= EXACT for d in result.checks.values()), result.checks
    # independently of the exporter's own check: a batch of 3 (traced with 1) against the run's model
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_t = load_run(run, torch.device("cpu")).model(x)
        logits = F.interpolate(out_t.masks, size=(64, 64), mode="bilinear", align_corners=False)
        if task == "binary":
            want = logits
        else:
            want = torch.einsum("bqc,bqhw->bchw", out_t.class_logits.softmax(-1)[..., :-1], logits.sigmoid())
    got = _ort(out, x)
    assert got.shape == ((3, 1, 64, 64) if task == "binary" else (3, 3, 64, 64))
    np.testing.assert_allclose(got, want.numpy(), atol=EXACT, rtol=0)
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["samft.task"] == task and meta["samft.peft_method"] == method and meta["samft.img_size"] == "64"


@needs_onnx
def test_static_batch_graph_takes_one_image(tmp_path):
    run, _ = make_run(tmp_path / "run", "lora")
    out = tmp_path / "model.onnx"
    with pytest.warns(UserWarning, match="random image only"):
        export_onnx(run, out)
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 64]
    seg = OnnxSegmenter(str(out))
    assert seg.max_batch == 1
    assert seg.run(np.zeros((3, 3, 64, 64), np.float32)).shape == (3, 1, 64, 64)  # chunked by the wrapper


@needs_onnx
def test_graph_is_fp32_with_layernorm_ops(tmp_path):
    run, _ = make_run(tmp_path / "run", "conv_lora")
    export_onnx(run, tmp_path / "m.onnx", image=real_image())
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)  # opset 17: one op, fp32
    float_types = {t.data_type for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    assert float_types == {onnx.TensorProto.FLOAT}


def test_non_exportable_attention_is_named(tmp_path, monkeypatch):
    run, model = make_run(tmp_path / "run", "lora")
    check_exportable(model, "sdpa")  # the registered ones export

    class Opaque(SDPAAttention):
        kind = "opaque"
        onnx_exportable = False

    model.image_encoder.blocks[0].attn = Opaque(model.image_encoder.blocks[0].attn)
    with pytest.raises(SamftError, match=r"model.attention: 'opaque' cannot be exported to ONNX"):
        check_exportable(model, "opaque")
    monkeypatch.setattr(SDPAAttention, "onnx_exportable", False)
    result = CliRunner().invoke(app, ["export", "--onnx", str(tmp_path / "m.onnx"), "--run", str(run)])
    assert result.exit_code == 2, result.output
    assert "model.attention: 'sdpa' cannot be exported to ONNX" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


@needs_onnx
def test_cli_prints_differences_and_size_and_refuses_to_overwrite(tmp_path):
    run, _ = make_run(tmp_path / "run", "conv_lora")
    out = tmp_path / "m.onnx"
    args = ["export", "--onnx", str(out), "--run", str(run), "--dynamic-batch", "--opset", "18"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "MiB" in result.output and "max |diff|: random image" in result.output and str(out) in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0
    bad = CliRunner().invoke(app, ["export", "--onnx", str(tmp_path / "x.onnx"), "--run", str(run), "--opset", "9"])
    assert bad.exit_code == 2 and "--opset 9: expected 14 to 20" in bad.output


@needs_onnx
def test_tolerance_exceeded_fails_and_writes_nothing(tmp_path):
    run, _ = make_run(tmp_path / "run", "lora")
    with pytest.raises(SamftError, match=r"onnxruntime differs from PyTorch by .* \(tolerance 1e-12\): not written"):
        export_onnx(run, tmp_path / "m.onnx", tolerance=1e-12, image=real_image())
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- export-friendly paths = normal paths


@pytest.mark.parametrize("top_k,gate_scales", [(1, False), (2, False), (2, True)])
def test_conv_lora_dense_mixture_equals_grouped_dispatch(top_k, gate_scales):
    torch.manual_seed(0)
    layer = ConvLoRALinear(torch.nn.Linear(16, 48), ConvLoRAConfig(rank=4, experts=4, top_k=top_k,
                                                                   gate_scales_output=gate_scales))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.w_gate.normal_()  # different samples choose different experts
    layer.eval()
    x = torch.randn(12, 7, 7, 16)
    chosen = layer.gate(F.linear(x, layer.lora_A).permute(0, 3, 1, 2))[0]
    assert len(chosen.unique()) > 1
    with torch.no_grad():
        want = layer(x)
        layer.export_friendly = True
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, layer.base_layer(x))


def _routed_layer(top_k: int, gate_scales: bool, dtype: torch.dtype = torch.float32) -> ConvLoRALinear:
    """A Conv-LoRA layer (8 experts, scales 1..8) whose samples choose different experts."""
    torch.manual_seed(0)
    layer = ConvLoRALinear(torch.nn.Linear(16, 48), ConvLoRAConfig(rank=4, experts=8, top_k=top_k,
                                                                   gate_scales_output=gate_scales))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.w_gate.normal_()
        for conv in layer.experts:
            conv.bias.normal_(0, 0.1)
    return layer.to(dtype).eval().requires_grad_(False)


GATHERED_FP32 = 1e-5  # gathered vs dense dispatch in fp32 (the same expert per sample; measured ~1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, GATHERED_FP32)])
@pytest.mark.parametrize("top_k,gate_scales", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_conv_lora_gathered_dispatch_equals_every_expert(n, top_k, gate_scales, dtype, tol):
    layer = _routed_layer(top_k, gate_scales, dtype)
    z = torch.randn(n, 4, 7, 7, dtype=dtype, generator=torch.Generator().manual_seed(n))
    if n == 16:
        assert len(layer.gate(z, False)[0].unique()) > 2  # several experts, some with no sample
    with torch.no_grad():
        got, want = layer.mixture_gathered(z, False)[0], layer.mixture_dense(z, False)[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert got.abs().max() > 0.1


class _Mixture(torch.nn.Module):
    def __init__(self, layer: ConvLoRALinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer.mix(z)


@needs_onnx
@pytest.mark.parametrize("top_k,gate_scales", [(1, False), (2, True)])
def test_conv_lora_export_runs_only_the_chosen_experts(top_k, gate_scales):
    """The exported mixture dispatches (NonZero per expert) and gives the dense path's output in onnxruntime
    for any batch size, one sample (most experts given no sample) included."""
    layer = _routed_layer(top_k, gate_scales)
    graph = _Mixture(layer).eval()
    buf = io.BytesIO()
    layer.export_friendly = True
    with torch.no_grad():
        torch.onnx.export(graph, (torch.randn(2, 4, 7, 7),), buf, opset_version=17, input_names=["z"],
                          dynamic_axes={"z": {0: "n"}}, dynamo=False)
    layer.export_friendly = False
    ops = [node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node]
    assert ops.count("NonZero") == 8, ops  # one dispatch per expert, no dense mixture
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for n in (1, 3, 16):
        z = torch.randn(n, 4, 7, 7, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = layer.mixture_dense(z, False)[0]
        np.testing.assert_allclose(session.run(None, {"z": z.numpy()})[0], want.numpy(), atol=EXACT, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 48, 80), (1, 3, 33, 17)])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.9])
def test_high_frequency_matmul_equals_fft(shape, ratio):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2
    torch.testing.assert_close(high_frequency_matmul(x, ratio), high_frequency(x, ratio), rtol=0, atol=2e-5)


# ---------------------------------------------------------------- deploy_onnx (numpy + onnxruntime)


def test_deploy_module_imports_no_torch():
    code = "import sys, samft.deploy_onnx; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("src,dst", [((10, 7), (23, 31)), ((64, 64), (17, 5)), ((9, 40), (9, 13)), ((1, 5), (4, 4))])
def test_resize_bilinear_equals_torch(src, dst):
    x = torch.randn(3, *src)
    want = F.interpolate(x[None], size=dst, mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(resize_bilinear(x.numpy(), dst), want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(64, 64), (64, 40), (100, 70), (37, 90), (300, 200), (513, 513)])
def test_preprocess_equals_samft_transform(hw):
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    want = SamTransform(64)(image)
    x, valid = preprocess(image, 64)
    assert valid == tuple(want["valid_hw"].tolist())
    diff = np.abs(x - want["image"].numpy()) * 57.12  # in grey levels (the smallest std)
    assert diff.max() <= (1e-3 if max(hw) == 64 else 1.0 + 1e-3)  # no resize: exact; resized: one level


@needs_onnx
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_deploy_predict_equals_samft_prediction(task, tmp_path):
    torch.manual_seed(0)  # the perturbed adapter, whatever ran before (Conv-LoRA's gate is discontinuous: one grey
    # level of resize rounding can flip an expert; some random adapters exceed the 3e-3 of a resized image then)
    run, _ = make_run(tmp_path / "run", "conv_lora", **(MULTICLASS if task == "multiclass" else {}))
    export_onnx(run, tmp_path / "m.onnx", dynamic_batch=True, image=real_image())
    seg = OnnxSegmenter(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    files = [real_image()] if real_image() else []
    for hw in [(64, 64), (64, 40), (100, 70), (300, 200)]:
        files.append(tmp_path / f"{hw[0]}x{hw[1]}.png")
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(files[-1])
    loaded = load_run(run, torch.device("cpu"))
    pairs = [Pair(f, None, f.stem) for f in files]
    for pair, scores, _ in iter_predictions(loaded.model, pairs, 2, torch.device("cpu"), make_task(loaded.cfg)):
        image = read_image(pair.image)
        got, prediction = seg.scores(image)
        assert got.shape == scores.shape and prediction.shape == image.shape[:2]
        tol = EXACT if max(image.shape[:2]) == 64 else RESIZED
        np.testing.assert_allclose(got, scores, atol=tol, rtol=0, err_msg=pair.name)
        if task == "binary":
            sure = np.abs(scores - 0.5) > tol  # away from the threshold the masks agree
            assert np.array_equal(prediction[sure], (scores >= 0.5)[sure])
        else:
            top2 = np.sort(scores, axis=0)[-2:]
            sure = top2[1] - top2[0] > 2 * tol
            assert np.array_equal(prediction[sure], scores.argmax(0)[sure])


def test_missing_extra_is_named(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path / "run", "lora")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when not installed
    with pytest.raises(SamftError, match=r"needs the onnx(runtime)? package: pip install 'samft\[onnx\]'"):
        export_onnx(run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
