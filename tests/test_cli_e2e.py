"""The real command line, end to end, on a tiny SAM: train -> eval -> predict -> resume, and user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from conftest import ROOT, RUN_FILES, TINY


def samft(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT),
           "SAMFT_CACHE": str(cwd / ".cache"),
           "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "samft", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"samft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("cli")
    samft("demo-data", "data", "--n", "20", cwd=cwd)
    config = {
        "model": TINY,
        "peft": {"method": "conv_lora"},
        "data": {"root": "data", "train": ".", "val_fraction": 0.25, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2, "device": "cpu"},
        "eval": {"batch_size": 4},
        "output": {"dir": "runs/e2e"},
    }
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(config))
    samft("train", "--config", "tiny.yaml", "--no-progress", cwd=cwd)
    return cwd


def test_demo_data_layout(workdir):
    images = sorted((workdir / "data" / "images").iterdir())
    masks = sorted((workdir / "data" / "masks").iterdir())
    assert len(images) == len(masks) == 20
    assert [p.name for p in images] == [p.name for p in masks]


def test_train_writes_exactly_the_run_artefacts(workdir):
    run = workdir / "runs" / "e2e"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["peft"] == {"method": "conv_lora", "conv_lora": saved["peft"]["conv_lora"]}
    assert Path(saved["data"]["root"]).is_absolute()
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [int(r["step"]) for r in steps] == list(range(1, 9))  # 15 train images / batch 4 = 4 steps x 2 epochs
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert all(r["val_dice@0.5"] and r["val_Sm"] for r in epochs)
    with safe_open(str(run / "adapter.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["sam_type"] == "tiny" and meta["peft_method"] == "conv_lora"
    assert meta["base_sha256"].startswith("random:") and meta["samft_version"] == "0.1.0"
    assert any(".lora_A" in k for k in keys) and any(k.startswith("decoder.") for k in keys)
    assert not any("base_layer" in k for k in keys), "frozen weights are not saved"
    with Image.open(run / "curves.png") as im:
        assert im.size[0] > 400


def test_eval_json_and_file(workdir):
    proc = samft("eval", "--run", "runs/e2e", "--json", cwd=workdir)
    result = json.loads(proc.stdout)
    on_disk = json.loads((workdir / "runs" / "e2e" / "eval.json").read_text())
    assert result == on_disk
    val = result["sets"]["val"]
    assert val["n_images"] == 5
    assert list(val["metrics"]) == ["dice@0.5", "iou@0.5", "meanDice", "meanIoU", "maxDice", "Sm", "wFm", "meanEm",
                                    "maxEm", "adpEm", "MAE", "BER"]
    assert all(0 <= v <= 1 for k, v in val["metrics"].items() if k != "BER")
    assert 0 <= val["metrics"]["BER"] <= 100
    assert (result["protocol"], result["scoring"], result["resize"]) == ("samft", "original_resolution", "pad")
    assert val["config_hash"] == result["config_hash"] and val["checkpoint"].endswith("adapter.safetensors")


def test_eval_table_and_named_data(workdir):
    proc = samft("eval", "--data", "all=data", cwd=workdir)  # --run defaults to the newest run
    assert "all" in proc.stdout and "dice@0.5" in proc.stdout
    assert json.loads((workdir / "runs" / "e2e" / "eval.json").read_text())["sets"]["all"]["n_images"] == 20


def test_predict_writes_masks_at_original_size(workdir):
    samft("predict", "data/images", "--run", "runs/e2e", "--out", "preds", "--overlay", cwd=workdir)
    images = sorted((workdir / "data" / "images").glob("*.png"))
    for img in images:
        mask_path = workdir / "preds" / img.name
        with Image.open(img) as a, Image.open(mask_path) as m:
            assert m.size == a.size and m.mode == "L"
            assert set(np.unique(np.asarray(m))) <= {0, 255}
        assert (workdir / "preds" / "overlays" / img.name).is_file()
    assert len(list((workdir / "preds").glob("*.png"))) == len(images)


def test_predict_glob_and_default_output(workdir):
    samft("predict", "data/images/000[0-2].png", "--run", "runs/e2e", cwd=workdir)
    out = workdir / "runs" / "e2e" / "predictions"
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "0002.png"]


def test_info_json(workdir):
    info = json.loads(samft("info", "--config", "tiny.yaml", "--json", cwd=workdir).stdout)
    assert info["peft_method"] == "conv_lora" and info["model"] == "tiny"
    assert info["adapted_modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert 0 < info["trainable_params"] < info["total_params"]


def test_resume_continues_the_run(workdir):
    samft("train", "--resume", "runs/e2e", "train.epochs=3", "--no-progress", cwd=workdir)
    lines = (workdir / "runs" / "e2e" / "metrics.csv").read_text().splitlines()[1:]
    epochs = [line.split(",")[1] for line in lines if line.startswith("epoch")]
    assert epochs == ["1", "2", "3"]
    steps = [int(line.split(",")[2]) for line in lines if line.startswith("step")]
    assert steps == list(range(1, 13)), "no step is repeated or lost"


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "tiny.yaml", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["train", "--config", "tiny.yaml", "train.epochs=two"], "train.epochs: expected int, got 'two'"),
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "--config", "tiny.yaml"], "already holds a run"),
    (["train", "--config", "tiny.yaml", "output.dir=runs/x", "data.root=nowhere"], "split not found"),
    (["train", "--config", "tiny.yaml", "output.dir=runs/y", "model.checkpoint=none.pth"], "none.pth"),
    (["eval", "--run", "runs/nothing"], "not a run directory"),
    (["eval", "--run", "runs/e2e", "--data", "oops"], "expected NAME=PATH"),
    (["predict", "missing.png", "--run", "runs/e2e"], "missing.png: no such file, folder or pattern"),
    (["info", "--config", "tiny.yaml", "peft.method=loraa"], "did you mean 'lora'"),
])
def test_user_errors_are_one_clear_line(workdir, args, message):
    proc = samft(*args, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_checkpoint_of_another_type_is_one_clear_line(workdir):
    import torch

    fake = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1280)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(32)})
    torch.save(fake, workdir / "sam_vit_h_4b8939.pth")
    proc = samft("info", "--config", "tiny.yaml", cwd=workdir, check=False)  # info needs no weights
    assert proc.returncode == 0
    proc = samft("train", "--config", "tiny.yaml", "model.type=vit_b", "model.img_size=64",
                 "model.checkpoint=sam_vit_h_4b8939.pth", "output.dir=runs/wrong", cwd=workdir, check=False)
    assert proc.returncode == 2
    assert ("sam_vit_h_4b8939.pth: this is a vit_h checkpoint (encoder width 1280, 32 blocks) but model.type is "
            "vit_b") in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


def test_printed_user_strings_keep_their_brackets(tmp_path):
    """rich markup never eats a user's text: a file name with [...] in an error, option lists in ``info``."""
    from typer.testing import CliRunner

    from samft.cli import app

    runner = CliRunner()
    missing = tmp_path / "scan[bad].png"
    result = runner.invoke(app, ["predict", str(missing), "--run", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "scan[bad].png" in result.output, result.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {type: tiny, img_size: 64}\npeft: {method: lora}\n")
    result = runner.invoke(app, ["info", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "'targets': ['qkv']" in result.output, result.output


def test_version():
    from typer.testing import CliRunner

    from samft.cli import app
    from samft.version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"samft {__version__}"


def test_predict_the_runs_own_validation_split(tmp_path, synthetic_dir):
    """samft predict --split val --run RUN: the held-out images the run listed in split.json."""
    import json

    from typer.testing import CliRunner

    from samft.cli import app
    from samft.engine.train.loop import train

    from conftest import tiny_config

    cfg = tiny_config("decoder_only", data={"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25},
                      train={"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu"},
                      output={"dir": str(tmp_path / "run")})
    run = train(cfg, show_progress=False)
    val = json.loads((run / "split.json").read_text())["val"]
    result = CliRunner().invoke(app, ["predict", "--split", "val", "--run", str(run), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    found = re.search(r"images/s with model loading, ([0-9.]+) images/s predicting", " ".join(result.output.split()))
    assert found and float(found.group(1)) > 0, result.output
    assert sorted(p.stem for p in (tmp_path / "o").glob("*.png")) == sorted(
        __import__("pathlib").Path(img).stem for img, _ in val)
    both = CliRunner().invoke(app, ["predict", "x.png", "--split", "val", "--run", str(run)])
    assert both.exit_code == 2 and "one of the two" in both.output
