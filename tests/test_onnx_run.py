"""``samft predict/eval --run model.onnx``: an ONNX export runs through samft's own prediction and evaluation
pipeline (onnxruntime in place of the model) and gives the run's masks, probabilities and metrics; a file
that is not one samft reads, or an ONNX file with damaged metadata, is one line naming it."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from samft.cli import app
from samft.engine.artifacts.onnx_export import export_onnx
from samft.engine.infer.segmenter import Segmenter

from test_export import make_run

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'samft[onnx]'")
pytest.importorskip("onnx")

MULTICLASS = dict(data={"classes": ["bg", "a", "b"]}, model={"num_mask_tokens": 5})
# binary: the graph's logits are the run's to fp32 rounding (~1e-6), and resized back by the same function
PROB_TOL = 1e-3  # probabilities (the .npy maps are float16: 2^-11 relative)
METRIC_TOL = 1e-4  # every binary metric of eval.json
# multi-class: the graph forms the class scores at the input size, the run after resizing its mask logits
# (measured here: 1e-3 at most, float16 .npy rounding included; 0 for an image at the input size)
SCORE_TOL = 1e-2  # class scores
MIOU_TOL = 0.03  # mIoU / pixel accuracy


def _images(folder: Path, classes: int = 0, seed: int = 0) -> Path:
    """Five images of mixed sizes (resized both ways) with masks: 0/255 (binary) or class ids."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for k, hw in enumerate([(64, 64), (64, 40), (100, 70), (37, 90), (130, 128)]):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(folder / "images" / f"im{k}.png")
        mask = rng.integers(0, classes, hw) if classes else rng.integers(0, 2, hw) * 255
        Image.fromarray(mask.astype(np.uint8)).save(folder / "masks" / f"im{k}.png")
    return folder


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def _exported(tmp_path: Path, method: str, dynamic: bool, **sections) -> tuple[Path, Path]:
    run, _ = make_run(tmp_path / "run", method, **sections)
    out = tmp_path / "model.onnx"
    with pytest.warns(UserWarning, match="random image only"):
        export_onnx(run, out, dynamic_batch=dynamic)
    return run, out


def _predict(model: Path, images: Path, out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _invoke("predict", str(images), "--run", str(model), "--out", str(out), "--probs", "npy", "--overlay",
            "--device", "cpu")
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(p.name for p in images.iterdir())
    return {p.stem: (np.asarray(Image.open(p)), np.load(out / "probs" / f"{p.stem}.npy").astype(np.float32))
            for p in sorted(out.glob("*.png"))}


def _eval(model: Path, data: Path) -> dict:
    _invoke("eval", "--run", str(model), "--data", f"s={data}", "--device", "cpu")
    written = model / "eval.json" if model.is_dir() else model.with_name(model.stem + ".eval.json")
    result = json.loads(written.read_text())["sets"]["s"]
    csv_file = written.parent / result["per_image"]
    assert len(list(csv.DictReader(csv_file.open()))) == result["n_images"] == 5
    return result


@pytest.mark.parametrize("method,dynamic", [("conv_lora", False), ("lora", True)])
def test_binary_onnx_predicts_and_scores_as_the_run(method, dynamic, tmp_path):
    run, model = _exported(tmp_path, method, dynamic)
    data = _images(tmp_path / "data")
    want = _predict(run, data / "images", tmp_path / "p_run")
    got = _predict(model, data / "images", tmp_path / "p_onnx")
    assert want.keys() == got.keys()
    for name, (mask, prob) in want.items():
        assert got[name][1].shape == prob.shape and got[name][0].shape == mask.shape
        np.testing.assert_allclose(got[name][1], prob, atol=PROB_TOL, rtol=0, err_msg=name)
        sure = np.abs(prob - 0.5) > PROB_TOL  # away from the threshold the masks are equal
        assert np.array_equal(got[name][0][sure], mask[sure]), name
    run_eval, onnx_eval = _eval(run, data), _eval(model, data)
    assert run_eval["metrics"].keys() == onnx_eval["metrics"].keys()
    for key, value in run_eval["metrics"].items():
        assert onnx_eval["metrics"][key] == pytest.approx(value, abs=METRIC_TOL, nan_ok=True), key


def test_multiclass_onnx_predicts_and_scores_as_the_run(tmp_path):
    run, model = _exported(tmp_path, "conv_lora", True, **MULTICLASS)
    data = _images(tmp_path / "data", classes=3)
    want = _predict(run, data / "images", tmp_path / "p_run")
    got = _predict(model, data / "images", tmp_path / "p_onnx")
    for name, (labels, scores) in want.items():
        assert got[name][1].shape == scores.shape == (3, *labels.shape)
        np.testing.assert_allclose(got[name][1], scores, atol=SCORE_TOL, rtol=0, err_msg=name)
        top2 = np.sort(scores, axis=0)[-2:]
        sure = top2[1] - top2[0] > 2 * SCORE_TOL  # away from a tie the labels are equal
        assert np.array_equal(got[name][0][sure], labels[sure]), name
    run_eval, onnx_eval = _eval(run, data), _eval(model, data)
    for key in ("mIoU", "pixel_acc"):
        assert onnx_eval["metrics"][key] == pytest.approx(run_eval["metrics"][key], abs=MIOU_TOL), key


def test_segmenter_and_tiles_take_an_onnx_file(tmp_path):
    run, model = _exported(tmp_path, "lora", False)
    image = np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    want = Segmenter.from_run(run, device="cpu").predict_scores(image)
    got = Segmenter.from_run(model, device="cpu").predict_scores(image)
    np.testing.assert_allclose(got, want, atol=PROB_TOL, rtol=0)
    data = _images(tmp_path / "data")
    _invoke("predict", str(data / "images"), "--run", str(model), "--out", str(tmp_path / "t"), "--tile", "64")
    assert len(list((tmp_path / "t").glob("*.png"))) == 5


def test_an_export_without_a_stored_config_reads_its_metadata(tmp_path):
    import onnx

    run, model = _exported(tmp_path, "lora", True)
    proto = onnx.load(str(model))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "samft.config_yaml"]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(model))
    data = _images(tmp_path / "data")
    assert _eval(model, data)["n_images"] == 5


# ---------------------------------------------------------------- what is refused, in one line


def _one_image(tmp_path: Path) -> str:
    path = tmp_path / "one.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    return str(path)


def _fails(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert len(text.splitlines()) == 1, text
    assert "weights_only" not in text and "Traceback" not in text, text
    return text


def _with_meta(model: Path, target: Path, **changes: str | None) -> Path:
    import onnx

    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            props.pop(f"samft.{key}", None)
        else:
            props[f"samft.{key}"] = value
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(target))
    return target


@pytest.mark.parametrize("key,value", [("img_size", None), ("img_size", "big"), ("img_size", "96"),
                                       ("task", "detection"), ("classes", "[oops"), ("classes", '["bg", "a"]'),
                                       ("threshold", "2"), ("config_yaml", "model: [")])
def test_damaged_metadata_is_one_line_naming_the_key(key, value, tmp_path):
    _, model = _exported(tmp_path, "lora", False)
    bad = _with_meta(model, tmp_path / "bad.onnx", **{key: value})
    text = _fails("predict", _one_image(tmp_path), "--run", str(bad), "--out", str(tmp_path / "o"))
    assert "bad.onnx" in text and f"'{key}'" in text, text


def test_files_samft_does_not_read_are_named(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not a model at all")
    assert "junk.onnx: not a readable ONNX model" in _fails("eval", "--run", str(junk), "--data", f"s={tmp_path}")
    other = tmp_path / "weights.bin"
    other.write_text("hello")
    text = _fails("predict", _one_image(tmp_path), "--run", str(other), "--out", str(tmp_path / "o"))
    assert "weights.bin" in text and ".pth" in text and ".onnx" in text and "run directory" in text, text
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX graph that samft did not write
    _, model = _exported(tmp_path / "x", "lora", False)
    import onnx

    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    assert "foreign.onnx" in _fails("predict", _one_image(tmp_path), "--run", str(foreign), "--out", str(tmp_path / "o"))


def test_without_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    _, model = _exported(tmp_path, "lora", False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "pip install 'samft[onnx]'" in _fails("predict", _one_image(tmp_path), "--run", str(model), "--out",
                                                 str(tmp_path / "o"))


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime has CUDA here")
def test_cuda_without_the_provider_is_refused(tmp_path, monkeypatch):
    import torch

    _, model = _exported(tmp_path, "lora", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # PyTorch could; onnxruntime cannot
    text = _fails("predict", _one_image(tmp_path), "--run", str(model), "--out", str(tmp_path / "o"), "--device", "cuda")
    assert "--device cuda" in text and "onnxruntime" in text, text
