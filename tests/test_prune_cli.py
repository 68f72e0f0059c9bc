"""A pruned run is a normal run: train -> prune -> eval -> predict -> export -> info through the CLI
(in-process, tiny SAM), each reading the pruned run exactly as the model that left the search (or the
fine-tuning) was."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as st_load
from typer.testing import CliRunner

import samft.engine.train.prune as prune_module
from samft.cli import app
from samft.data.synthetic import write_dataset
from samft.engine.artifacts.export import load_exported
from samft.engine.train.prune import ARCH_FILE, PRUNED_FILE, REPORT_FILE, load_pruned_run
from samft.engine.artifacts.loading import load_run
from samft.engine.infer.segmenter import Segmenter
from samft.prune.flops import encoder_block_flops, gmacs
from samft.prune.search_block import SearchBlock

from conftest import RUN_FILES, TINY

PRUNED_FILES = {ARCH_FILE, PRUNED_FILE, REPORT_FILE}
# block 0: 3x3 conv with the first 96 of 128 MLP units; block 1 (global attention): MSA, 64 units
PLAN = [("conv3", torch.tensor([1.5, 1.5, -1.5]), 96), ("msa", torch.tensor([1.5, 1.5, 1.5]), 64)]


def cli(*args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A trained LoRA run (LoRA on qkv and lin1, so both a kept attention and a sliced MLP carry one)."""
    w = tmp_path_factory.mktemp("prune_cli")
    write_dataset(w / "data", n=12, seed=1)
    config = {"model": TINY, "peft": {"method": "lora", "lora": {"targets": ["qkv", "lin1"]}},
              "data": {"root": str(w / "data"), "train": ".", "val_fraction": 0.25, "num_workers": 0},
              "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu", "progress": False},
              "eval": {"batch_size": 4}, "output": {"dir": str(w / "dense")}}
    (w / "tiny.yaml").write_text(yaml.safe_dump(config))
    cli("train", "--config", w / "tiny.yaml", "--no-progress")
    return w


@pytest.fixture
def fixed_search(monkeypatch):
    """The real search (a few steps: BatchNorm statistics, head_probs, the run's parameters move), then the
    thresholds set to PLAN so the architecture is known; ``captured["model"]`` is the searched model, which
    prune_run rebuilds in place and leaves in eval mode."""
    captured = {}
    real = prune_module.search

    def search(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            for blk, (_, attn, units) in zip(model.image_encoder.blocks, PLAN):
                assert isinstance(blk, SearchBlock)
                blk.attn_thresholds.copy_(attn)
                blk.mlp_thresholds.fill_(-1.0)[:units] = 1.0
        captured["model"] = model
        return result

    monkeypatch.setattr(prune_module, "search", search)
    return captured


def _prune(work, out, *extra):
    return cli("prune", "--run", work / "dense", "--target-gmacs", "0.0008", "--search-steps", "3",
               "--arch-lr", "1e-3", "--out", out, "--no-progress", *extra)


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x).masks


def test_pruned_run_without_finetuning_is_a_normal_run(work, fixed_search, tmp_path):
    out = work / "pruned0"
    _prune(work, out, "--finetune-epochs", "0")
    assert {p.name for p in out.iterdir()} == PRUNED_FILES | {"config.yaml", "adapter.safetensors", ".samft-run"}
    searched = fixed_search["model"]
    arch = json.loads((out / ARCH_FILE).read_text())["architecture"]
    assert [(b["attn"], b["mlp_units"]) for b in arch["blocks"]] == [(a, u) for a, _, u in PLAN]
    x = torch.randn(2, 3, 64, 64)
    ref = _outputs(searched, x)
    torch.testing.assert_close(_outputs(load_pruned_run(out).model, x), ref, rtol=0, atol=0)
    torch.testing.assert_close(_outputs(load_run(out, torch.device("cpu")).model, x), ref, rtol=0, atol=0)

    # eval: the metrics prune_run measured on the in-memory model right after the search
    evaluated = json.loads(cli("eval", "--run", out, "--json").stdout)["sets"]["val"]["metrics"]
    measured = json.loads((out / REPORT_FILE).read_text())["metrics"]["pruned"]
    assert evaluated == pytest.approx(measured, rel=1e-6, abs=1e-9)

    # predict: the masks the searched model gives
    images = sorted((work / "data" / "images").iterdir())[:3]
    cli("predict", *images, "--run", out, "--out", tmp_path / "pred")
    seg = Segmenter(searched, load_run(out, torch.device("cpu")).cfg, torch.device("cpu"))
    for image in images:
        written = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}.png")) > 0
        np.testing.assert_array_equal(written, seg.predict(image))
    assert (Segmenter.from_run(out, device="cpu").predict_scores(images[0]) == seg.predict_scores(images[0])).all()

    moved = tmp_path / "moved"  # an earlier version's moved run (model.pruned absolute) finds its own, and says so
    shutil.copytree(out, moved)
    saved = yaml.safe_load((moved / "config.yaml").read_text())
    saved["model"]["pruned"] = str((out / PRUNED_FILE).resolve())
    (moved / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (out / PRUNED_FILE).rename(out / "gone.safetensors")
    with pytest.warns(UserWarning, match="not found; using"):
        again = load_run(moved, torch.device("cpu")).model
    torch.testing.assert_close(_outputs(again, x), ref, rtol=0, atol=0)


def test_export_and_info_of_a_pruned_run(work, fixed_search):
    out = work / "pruned_export"
    _prune(work, out, "--finetune-epochs", "0")
    searched = fixed_search["model"]
    result = cli("export", "--merged", work / "pruned.pth", "--run", out)
    assert "pruned model (3 lora layer(s) merged)" in result.output  # block 1: qkv, lin1; block 0: lin1
    exported = load_exported(work / "pruned.pth")
    assert not any("lora" in k for k in exported.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_outputs(exported, x), _outputs(searched, x), rtol=1e-5, atol=1e-5)

    info = json.loads(cli("info", "--config", out / "config.yaml", "--json").stdout)
    pruned = gmacs(encoder_block_flops(searched.image_encoder, 64)["total"])
    saved = json.loads((out / ARCH_FILE).read_text())
    assert info["encoder_gmacs"] == pytest.approx(pruned) == pytest.approx(saved["pruned_gmacs"])
    assert info["encoder_gmacs_dense"] == pytest.approx(saved["dense_gmacs"])
    assert [(b["attn"], b["mlp_units"], b["mlp_units_dense"]) for b in info["pruned_blocks"]] == [
        (a, u, 128) for a, _, u in PLAN]
    for b in info["pruned_blocks"]:
        assert 0 < b["gmacs_after"] < b["gmacs_before"]
    assert info["adapted_modules"] == ["blocks.0.mlp.lin1", "blocks.1.attn.qkv", "blocks.1.mlp.lin1"]
    text = cli("info", "--config", out / "config.yaml").output
    assert "conv3" in text and "MLP 96/128" in text


def _last_validation(run_dir) -> dict[str, float]:
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["kind"] == "epoch"]
    return {k[len("val_"):]: float(v) for k, v in rows[-1].items() if k.startswith("val_")}, len(rows)


def test_finetuning_runs_the_training_loop_and_resumes(work, fixed_search):
    out = work / "pruned_ft"
    _prune(work, out, "--finetune-epochs", "1", "train.lr=5e-4")
    assert {p.name for p in out.iterdir()} == PRUNED_FILES | RUN_FILES
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["lr"] == 5e-4
    assert cfg["model"]["pruned"] == PRUNED_FILE  # relative: the run can be moved
    # eval of the run = the training loop's own validation of the fine-tuned model (metrics.csv, 6 digits)
    evaluated = json.loads(cli("eval", "--run", out, "--json").stdout)["sets"]["val"]["metrics"]
    logged, epochs = _last_validation(out)
    assert epochs == 1 and evaluated == pytest.approx(logged, rel=1e-4, abs=1e-5)
    report = json.loads((out / REPORT_FILE).read_text())["metrics"]
    assert report["finetuned"] == pytest.approx(evaluated, rel=1e-6, abs=1e-9)
    # the fine-tuning started from the pruned state: the run's frozen tensors and buffers are the file's
    tuned = load_run(out, torch.device("cpu")).model
    saved = st_load((out / PRUNED_FILE).read_bytes())
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert any(n.endswith("conv.bn.weight") for n in trainable) and any("lora" in n for n in trainable)
    frozen = {k: v for k, v in tuned.state_dict().items() if k not in trainable}
    assert frozen.keys() == saved.keys() - trainable and any(k.endswith("running_var") for k in frozen)
    for k, v in frozen.items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    before = _outputs(load_pruned_run(out).model, x)
    assert not torch.equal(_outputs(tuned, x), before)  # fine-tuning moved it

    cli("prune", "--resume", out, "train.epochs=2", "--no-progress")  # one more epoch, resumed by the loop
    assert _last_validation(out)[1] == 2
    result = CliRunner().invoke(app, ["prune", "--run", str(out), "--target-gmacs", "0.0005", "--search-steps", "1"])
    assert result.exit_code == 2 and "already a pruned run" in result.output


def test_prune_user_errors(work, tmp_path):
    result = CliRunner().invoke(app, ["info", "--config", str(work / "tiny.yaml"), f"model.pruned={tmp_path / 'x'}"])
    assert result.exit_code == 2 and "file not found" in result.output
    (tmp_path / "x").write_bytes(b"not a pruned model")
    result = CliRunner().invoke(app, ["info", "--config", str(work / "tiny.yaml"), f"model.pruned={tmp_path / 'x'}"])
    assert result.exit_code == 2 and "not a safetensors file" in result.output
    result = CliRunner().invoke(app, ["prune", "--resume", str(tmp_path / "nothing"), "--search-steps", "1"])
    assert result.exit_code == 2 and "--target-gmacs" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["prune", "--run", str(work / "dense"), "--target-gmacs", "0.0008",
                                      "--search-steps", "1", "--out", str(tmp_path / "o"), "train.nope=1"])
    assert result.exit_code == 2 and "train.nope" in result.output and not (tmp_path / "o").exists()


def test_an_interrupted_search_resumes_through_the_cli(work, monkeypatch):
    out = work / "pruned_resume"
    real = prune_module.search
    seen = []

    def interrupted(model, *args, **kwargs):
        def log(record):
            seen.append(record)
            if record["step"] == 3:
                raise KeyboardInterrupt
        return real(model, *args, **{**kwargs, "log": log})

    monkeypatch.setattr(prune_module, "search", interrupted)
    common = ["--run", str(work / "dense"), "--target-gmacs", "0.0008", "--arch-lr", "1e-3", "--search-save-every",
              "2", "--no-progress"]
    args = [*common, "--search-steps", "4"]
    result = CliRunner().invoke(app, ["prune", *args, "--out", str(out)])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert (out / "search_state.pt").is_file() and not (out / PRUNED_FILE).exists()
    monkeypatch.setattr(prune_module, "search", real)
    changed = CliRunner().invoke(app, ["prune", *common, "--search-steps", "5", "--resume", str(out)])
    assert changed.exit_code == 2 and "steps=4" in changed.output  # another setting: refused, not continued
    result = cli("prune", *args, "--resume", out)
    assert not (out / "search_state.pt").exists() and (out / PRUNED_FILE).is_file()
    history = json.loads((out / REPORT_FILE).read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4] and history[:2] == seen[:2]


USER_FILES = {"metrics.csv": "a,b\n1,2\n", "eval.json": '{"sets": {}}', "split.json": "{}",
              "config.yaml": "mine: 1\n", "notes.txt": "my notes"}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _refused(*args):
    result = CliRunner().invoke(app, ["prune", *(str(a) for a in args)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


@pytest.mark.parametrize("extra", [(), ("pruned.safetensors",)])
@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_prune_never_writes_into_a_folder_samft_did_not_create(work, tmp_path, how, extra):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in {**USER_FILES, **{n: "x" for n in extra}}.items():
        (mine / name).write_text(text)
    before = _snapshot(mine)
    where = ["--resume", mine] if how == "resume" else ["--out", mine, "--overwrite"]
    output = _refused("--run", work / "dense", "--target-gmacs", "0.0008", "--search-steps", "1", "--no-progress",
                      *where)
    assert ("not a pruned run samft made" if how == "resume" else "samft did not create") in output
    assert _snapshot(mine) == before


def test_prune_resume_of_a_run_that_is_not_a_pruned_one_is_refused(work, tmp_path):
    dense = tmp_path / "dense"  # a run samft made, but a dense training: --resume must not replace it
    shutil.copytree(work / "dense", dense)
    before = _snapshot(dense)
    output = _refused("--run", work / "dense", "--target-gmacs", "0.0008", "--search-steps", "1", "--no-progress",
                      "--resume", dense)
    assert "not a pruned run samft made" in output and _snapshot(dense) == before
    output = _refused("--run", work / "dense", "--resume", tmp_path / "nothing", "--target-gmacs", "0.0008",
                      "--search-steps", "1")
    assert "not a pruned run samft made" in output and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("option,value", [("--target-gmacs", "nan"), ("--target-gmacs", "inf"), ("--target-gmacs", "0"),
                                          ("--target-gmacs", "-1"), ("--arch-lr", "inf"), ("--arch-lr", "nan"),
                                          ("--arch-lr", "0"), ("--arch-lr", "-0.1"), ("--lambda", "nan"),
                                          ("--lambda", "-1"), ("--finetune-epochs", "-1")])
def test_meaningless_prune_numbers_are_refused_in_one_line(work, tmp_path, option, value):
    args = {"--target-gmacs": "0.0008", "--arch-lr": "1e-3", option: value}
    output = _refused("--run", work / "dense", "--search-steps", "1", "--out", tmp_path / "o", "--no-progress",
                      *[x for kv in args.items() for x in kv])
    assert option in output and "expected" in output and not (tmp_path / "o").exists()


def test_a_pruned_run_is_relocatable(work, fixed_search, tmp_path):
    out = tmp_path / "pruned"
    _prune(work, out, "--finetune-epochs", "0")
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["pruned"] == PRUNED_FILE  # relative
    x = torch.randn(2, 3, 64, 64)
    ref = _outputs(load_run(out, torch.device("cpu")).model, x)
    copied = tmp_path / "copied"  # a copy reads its own pruned.safetensors, not the original's
    shutil.copytree(out, copied)
    (out / PRUNED_FILE).write_bytes((copied / "adapter.safetensors").read_bytes())  # the original's changes
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(copied, moved)
    shutil.rmtree(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not the fallback for a model.pruned that is gone
        loaded = load_run(moved, torch.device("cpu"))
    assert loaded.cfg.model.pruned == str(moved / PRUNED_FILE)
    torch.testing.assert_close(_outputs(loaded.model, x), ref, rtol=0, atol=0)
    evaluated = json.loads(cli("eval", "--run", moved, "--json").stdout)["sets"]["val"]
    assert evaluated["n_images"] > 0
    image = sorted((work / "data" / "images").iterdir())[0]
    cli("predict", image, "--run", moved, "--out", tmp_path / "pred")
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    assert yaml.safe_load((moved / "config.yaml").read_text())["model"]["pruned"] == PRUNED_FILE
