"""The config package is only a schema: no torch and no model/PEFT/engine module in any call; registry
names come from samft/config/names.py and equal what the registries register; small functions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from samft.config import ATTENTIONS, PEFT_METHODS, RESUMABLE_KEYS, SAM_TYPES, PeftConfig, config_from_dict
from samft.config.names import check_registered
from samft.config.peft import options_class
from samft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "samft.model", "samft.peft", "samft.engine", "samft.prune", "samft.tasks", "samft.slip",
         "samft.data")

# everything the config does, in a fresh interpreter: build, validate, write, load a YAML with overrides, fail
_EXERCISE = r"""
import json, sys
from pathlib import Path
import samft.config as c
from samft.errors import ConfigError

cfg = c.config_from_dict({})
c.validate(cfg)
c.dump_yaml(cfg)
c.config_hash(cfg)
c.describe_fields()
c.unused_option_warnings(cfg)
for method in c.PEFT_METHODS:
    c.to_dict(c.config_from_dict({"peft": {"method": method}}))
path = Path(sys.argv[1]) / "c.yaml"
path.write_text("model: {type: tiny, attention: bra}\npeft: {method: lora}\nloss: {balance_weight: 2}\n")
cfg = c.load_config(path, ["train.lr=3e-4", "peft.lora.rank=5", "data.classes=[bg, a]", "train.metric=miou"])
assert (cfg.peft.lora.rank, cfg.train.lr, cfg.loss.aux.balance, cfg.model.type) == (5, 3e-4, 2.0, "tiny")
for bad in (["model.type=vit_hh"], ["model.attention=flash"], ["peft.method=lorra"], ["train.lrr=1"],
            ["loss.ssl.weight=1", "data.unlabelled=[x]", "peft.method=decoder_only"], ["peft.ssf.targets=[x]"]):
    try:
        c.load_config(path, bad)
        raise SystemExit(f"no error for {bad}")
    except ConfigError:
        pass
heavy = sys.argv[2].split(",")
print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))))
"""


def test_the_config_imports_no_torch_and_no_model_peft_or_engine_in_any_call(tmp_path):
    out = subprocess.run([sys.executable, "-c", _EXERCISE, str(tmp_path), ",".join(HEAVY)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_registries_register_exactly_the_config_names():
    from samft.model.attention import attention_names
    from samft.model.sam import sam_sizes
    from samft.peft import all_methods

    assert tuple(sam_sizes()) == SAM_TYPES
    assert attention_names() == ATTENTIONS
    assert tuple(all_methods()) == PEFT_METHODS
    for name, spec in all_methods().items():
        assert spec.config_cls is options_class(name) is type(getattr(PeftConfig(), name))


def test_a_name_missing_from_the_config_is_a_developer_error():
    from samft.model.attention import attention_names, register_attention
    from samft.peft import all_methods, registry

    with pytest.raises(RuntimeError, match=r"'flash' is registered but missing from samft/config/names.py"):
        register_attention("flash", help="")(type("Flash", (), {}))
    with pytest.raises(RuntimeError, match=r"PEFT method 'lorra' is registered but missing"):
        registry.register("lorra", type("LorraConfig", (), {}), help="")(lambda encoder, cfg: [])
    with pytest.raises(RuntimeError, match=r"SAM size 'vit_x'"):
        check_registered("SAM size", "vit_x", SAM_TYPES)
    assert "flash" not in attention_names() and "lorra" not in all_methods()


def test_peft_section_is_a_written_out_dataclass_with_only_the_active_method_saved():
    from samft.config import to_dict

    cfg = config_from_dict({"peft": {"method": "ssf"}})
    assert isinstance(cfg.peft, PeftConfig) and cfg.method_cfg is cfg.peft.ssf
    assert set(to_dict(cfg)["peft"]) == {"method", "ssf"}
    with pytest.raises(ConfigError, match=r"peft.vpt.dropout: 1.0 must be below 1"):
        config_from_dict({}, ["peft.vpt.dropout=1"])  # every method's section is checked, active or not


def test_resumable_keys_come_from_the_schema():
    assert set(RESUMABLE_KEYS) == {"train.epochs", "train.max_steps", "train.log_every", "train.save_every",
                                   "train.val_every", "train.patience", "train.progress", "train.num_threads",
                                   "train.device", "train.loggers", "train.log_images_every", "train.mlflow_uri",
                                   "train.mlflow_experiment", "data.num_workers", "data.check", "eval.batch_size"}


# Function size and complexity of samft/config: tests/test_architecture.py::test_functions_are_small
