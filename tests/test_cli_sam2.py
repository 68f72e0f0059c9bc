"""The command line on a tiny SAM 2.1 (model.family=sam2 model.type=tiny): train -> eval -> predict -> info,
export (merged in the SAM 2.1 layout, read back to the same outputs; ONNX checked by onnxruntime), and prune refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_cli_e2e import samft


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("cli_sam2")
    samft("demo-data", "data", "--n", "12", cwd=cwd)
    config = {
        "model": {"family": "sam2", "type": "tiny", "img_size": 64},
        "peft": {"method": "lora"},
        "data": {"root": "data", "train": ".", "val_fraction": 0.25, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
        "eval": {"batch_size": 4},
        "output": {"dir": "runs/sam2"},
    }
    (cwd / "tiny2.yaml").write_text(yaml.safe_dump(config))
    samft("train", "--config", "tiny2.yaml", "--no-progress", cwd=cwd)
    return cwd


def test_train_eval_predict(workdir):
    saved = yaml.safe_load((workdir / "runs" / "sam2" / "config.yaml").read_text())
    assert (saved["model"]["family"], saved["model"]["type"]) == ("sam2", "tiny")
    report = json.loads(samft("eval", "--run", "runs/sam2", "--json", cwd=workdir).stdout)
    assert report
    samft("predict", "data/images", "--run", "runs/sam2", "--out", "preds", cwd=workdir)
    assert len(list((workdir / "preds").glob("*.png"))) == 12
    samft("predict", "data/images/0000.png", "--run", "runs/sam2", "--out", "tiled", "--tile", "32", cwd=workdir)
    assert (workdir / "tiled" / "0000.png").is_file()


def _numbers(report, prefix: str = "") -> dict[str, float]:
    """Every metric in an eval report, by its path (not the time stamps and durations)."""
    if isinstance(report, dict):
        return {k: v for key, value in report.items() for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(report, list):
        return {k: v for i, value in enumerate(report) for k, v in _numbers(value, f"{prefix}{i}.").items()}
    timing = prefix.endswith(("evaluated.", "seconds."))
    return {prefix: float(report)} if isinstance(report, (int, float)) and not isinstance(report, bool) and \
        not timing else {}


def test_data_check_on_a_sam2_config(workdir):
    report = json.loads(samft("data", "check", "--config", "tiny2.yaml", "--json", cwd=workdir).stdout)
    assert sum(s["pairs"] for s in report["splits"].values()) == 12 and report["ok"]


def test_info_json_names_the_family(workdir):
    info = json.loads(samft("info", "--config", "tiny2.yaml", "--json", cwd=workdir).stdout)
    assert (info["family"], info["model"]) == ("sam2", "tiny")
    assert info["adapted_modules"] == [f"blocks.{i}.attn.qkv" for i in range(5)]


def test_export_and_prune(workdir):
    proc = samft("export", "--run", "runs/sam2", "--merged", "m.pth", cwd=workdir)
    assert "sam2's build_sam2 loads strictly" in proc.stdout + proc.stderr and (workdir / "m.head.safetensors").is_file()
    # eval and predict on the merged export reproduce the run's (the same masks, the same metrics)
    run = json.loads(samft("eval", "--run", "runs/sam2", "--json", cwd=workdir).stdout)
    exported = json.loads(samft("eval", "--run", "m.pth", "--json", cwd=workdir).stdout)
    assert _numbers(exported) == pytest.approx(_numbers(run), abs=1e-4)
    samft("predict", "data/images", "--run", "runs/sam2", "--out", "p_run", cwd=workdir)
    samft("predict", "data/images", "--run", "m.pth", "--out", "p_export", cwd=workdir)
    for png in (workdir / "p_run").glob("*.png"):
        assert png.read_bytes() == (workdir / "p_export" / png.name).read_bytes(), png.name
    samft("export", "--run", "runs/sam2", "--onnx", "m.onnx", cwd=workdir)
    assert (workdir / "m.onnx").is_file()
    proc = samft("prune", "runs/sam2", "--target-gmacs", "0.001", "--out", "pruned", cwd=workdir, check=False)
    assert proc.returncode != 0 and "samft prune is for SAM 1 runs" in proc.stdout + proc.stderr
