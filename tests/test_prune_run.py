"""``samft.engine.train.prune``: a trained run pruned into a new run directory that loads back to the same model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from samft.engine.artifacts.rundir import ADAPTER_FILE, CONFIG_FILE

from samft.engine.artifacts.loading import load_run
from samft.errors import SamftError
from samft.prune.errors import PruneError
from samft.prune.flops import encoder_block_flops, gmacs
from samft.prune.rebuild import PrunedBlock
from samft.engine.train.prune import ARCH_FILE, PRUNED_FILE, REPORT_FILE, load_pruned_run, PruneArgs, prune_run

from test_export import make_run


def _make_run(run_dir, data_dir, method="lora"):
    """test_export's run maker, with this file's data and training settings; returns the run's model."""
    return make_run(run_dir, method, data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                    train={"batch_size": 2, "lr": 1e-3, "seed": 3}, output={"dir": str(run_dir)})[1]


def test_prune_run_writes_a_run_that_loads_back(tmp_path, synthetic_dir):
    run = tmp_path / "run"
    dense = _make_run(run, synthetic_dir)
    dense_gmacs = gmacs(encoder_block_flops(dense.image_encoder, 64)["total"])
    target = 0.8 * dense_gmacs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune_run(PruneArgs(run, target, search_steps=12, finetune_epochs=1, arch_lr=0.2))
    out = tmp_path / "run-pruned"
    assert report.out_dir == out
    for name in (CONFIG_FILE, ARCH_FILE, PRUNED_FILE, REPORT_FILE):
        assert (out / name).is_file()
    assert report.dense_gmacs == pytest.approx(dense_gmacs) and report.pruned_gmacs < dense_gmacs
    assert set(report.metrics) == {"source", "pruned", "finetuned"}
    saved = json.loads((out / ARCH_FILE).read_text())
    assert saved["architecture"] == report.arch and saved["pruned_gmacs"] == report.pruned_gmacs
    assert (out / ADAPTER_FILE).is_file() and (out / "metrics.csv").is_file()  # fine-tuned by the training loop
    loaded = load_run(out, torch.device("cpu"))  # as eval/predict/export load it: the fine-tuned model
    assert all(isinstance(b, PrunedBlock) for b in loaded.model.image_encoder.blocks)
    assert gmacs(encoder_block_flops(loaded.model.image_encoder, 64)["total"]) == pytest.approx(report.pruned_gmacs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).masks, report.model.eval()(x).masks)
        before = load_pruned_run(out).model(x).masks  # the model as it left the search
    assert not torch.equal(before, loaded.model(x).masks)
    with pytest.raises(SamftError, match="already holds a run.*--overwrite"):
        prune_run(PruneArgs(run, target, search_steps=1, out_dir=out))
    with pytest.raises(PruneError, match="not a pruned run"):
        load_pruned_run(run)


def test_cli_prune(tmp_path, synthetic_dir):
    from typer.testing import CliRunner

    from samft.cli import app

    run = tmp_path / "run"
    _make_run(run, synthetic_dir, method="decoder_only")
    out = tmp_path / "small"
    result = CliRunner().invoke(app, ["prune", "--run", str(run), "--target-gmacs", "0.0008", "--search-steps", "2",
                                      "--arch-lr", "0.01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # 2 steps cannot close a gate; the gates' order meets the target all the same, and the report says so
    assert "encoder GMACs" in result.output and "(target 0.0008: reached" in result.output
    assert "NOT reached" not in result.output and "the thresholds alone fixed 0.0009769" in result.output
    saved = json.loads((out / ARCH_FILE).read_text())
    assert saved["reached"] and saved["pruned_gmacs"] <= 0.0008 < saved["search_gmacs"]
    assert (out / ARCH_FILE).is_file()
    result = CliRunner().invoke(app, ["prune", "--run", str(run), "--target-gmacs", "0.0008", "--search-steps", "2",
                                      "--out", str(out)])
    assert result.exit_code == 2 and "already holds a run" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("target,said", [("0.0005", "below this encoder's floor 0.0005571 GMACs"),
                                         ("0.001", "not below this run's dense encoder (0.0009769 GMACs)")])
def test_a_target_out_of_reach_is_refused_in_one_line_before_searching(tmp_path, synthetic_dir, target, said):
    from typer.testing import CliRunner

    from samft.cli import app

    run = tmp_path / "run"
    _make_run(run, synthetic_dir, method="decoder_only")
    out = tmp_path / "small"
    result = CliRunner().invoke(app, ["prune", "--run", str(run), "--target-gmacs", target, "--search-steps", "2",
                                      "--out", str(out)])
    assert result.exit_code == 2 and said in result.output and "nothing" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_prune_device_defaults_to_auto_like_every_command():
    import typer

    from samft.cli import app

    commands = typer.main.get_command(app).commands
    defaults = {name: {p.name: p.default for p in cmd.params}.get("device") for name, cmd in commands.items()}
    assert defaults["prune"] == "auto" == defaults["eval"] == defaults["predict"]
    assert PruneArgs().device == "auto"
    lam_help = next(p.help for p in commands["prune"].params if p.name == "lam")
    assert "samft's rule" in lam_help and "1.1x the task loss" in lam_help and "authors' rule" not in lam_help
