"""``samft config keys`` (every key with its type, default and help, torch-free) and ``samft config show`` (the
resolved config, exactly a run's config.yaml)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from samft.cli import app
from samft.config import PEFT_METHODS, describe_fields

from conftest import ROOT, TINY


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _rows(output: str) -> dict[str, list[str]]:
    """key -> [type, default, help] of ``config keys``' table (columns split on two spaces or more)."""
    import re

    lines = output.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["key", "type", "default", "help"]
    return {parts[0]: parts[1:] for parts in (re.split(r"\s{2,}", line, maxsplit=3) for line in lines[1:])}


def test_config_keys_lists_every_key_with_type_default_and_help():
    result = _invoke("config", "keys")
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert list(rows) == [k for k, _, _ in describe_fields()]
    assert rows["train.lr"] == ["float", "0.0001", "peak AdamW learning rate"]
    assert rows["train.batch_size"][:2] == ["int or null", "null"]
    assert rows["peft.lora.targets"][:2] == ["list of str", "[qkv]"]
    assert rows["train.epochs"][2].endswith("(--resume may change it)")
    assert not rows["train.lr"][2].endswith("(--resume may change it)")


@pytest.mark.parametrize("section, first, every", [("train", "train.epochs", "train."),
                                                   ("peft.lora", "peft.lora.targets", "peft.lora."),
                                                   ("train.lr", "train.lr", "train.lr")])
def test_config_keys_of_a_section(section, first, every):
    result = _invoke("config", "keys", section)
    assert result.exit_code == 0, result.output
    keys = list(_rows(result.output))
    assert keys[0] == first and all(k.startswith(every) for k in keys)
    assert keys == [k for k, _, _ in describe_fields() if k == section or k.startswith(section + ".")]


def test_config_keys_json():
    result = _invoke("config", "keys", "train.val_every", "--json")
    assert json.loads(result.output) == [{"key": "train.val_every", "type": "int", "default": "1",
                                          "help": dict((k, h) for k, _, h in describe_fields())["train.val_every"],
                                          "resumable": True}]


def test_an_unknown_section_is_one_line_with_the_nearest_name():
    result = _invoke("config", "keys", "trian")
    assert result.exit_code == 2
    assert "unknown config section or key 'trian' (did you mean 'train'?)" in result.output
    assert "Traceback" not in result.output
    partial = _invoke("config", "keys", "train.val")  # a section is whole names, not the start of one
    assert partial.exit_code == 2 and "did you mean 'train.val_every'?" in partial.output


_TORCH_FREE = r"""
import runpy, sys
sys.argv = ["samft"] + sys.argv[1:]
try:
    runpy.run_module("samft", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("torch loaded" if "torch" in sys.modules else "torch-free", file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["config", "keys", "train"], ["config", "show", "--config", "c.yaml"]])
def test_config_commands_import_no_torch(tmp_path, args):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": TINY, "data": {"root": "data"}}))
    out = subprocess.run([sys.executable, "-c", _TORCH_FREE, *args], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and out.stderr.strip().splitlines()[-1] == "torch-free"


def test_config_show_is_the_config_yaml_the_run_writes(tmp_path, synthetic_dir, monkeypatch):
    """Protocol (autogluon: batch 1, accum 4), overrides and relative paths resolved as the training stores them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(synthetic_dir)
    config = {"protocol": "autogluon", "model": TINY, "peft": {"method": "lora"},
              "data": {"root": "data", "train": ".", "val_fraction": 0.25, "num_workers": 0},
              "train": {"epochs": 1, "device": "cpu", "progress": False, "max_steps": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", "c.yaml", "peft.lora.rank=2", "data.check=quick"]
    shown = _invoke("config", "show", *args)
    assert shown.exit_code == 0, shown.output
    data = yaml.safe_load(shown.stdout)
    assert data["data"]["root"] == str(synthetic_dir.resolve())  # absolute (symlinks resolved)
    assert (data["train"]["batch_size"], data["train"]["accum_steps"], data["peft"]) == (
        1, 4, {"method": "lora", "lora": {**data["peft"]["lora"], "rank": 2}})
    trained = _invoke("train", *args, "--no-progress")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "runs" / "c" / "config.yaml").read_text() == shown.stdout


def test_config_show_all_has_every_method_and_errors_are_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": TINY}))
    every = yaml.safe_load(_invoke("config", "show", "--config", str(tmp_path / "c.yaml"), "--all").stdout)
    assert list(every["peft"]) == ["method", "blocks", *PEFT_METHODS]
    bad = _invoke("config", "show", "--config", str(tmp_path / "c.yaml"), "train.lrr=1")
    assert bad.exit_code == 2 and "did you mean 'train.lr'" in bad.output and "Traceback" not in bad.output
