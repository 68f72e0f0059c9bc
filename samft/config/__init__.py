"""Typed configuration: a tree of dataclasses, strict YAML loading and ``key=value`` overrides.

Every field has a default and one line of help (``samft.config.field.opt``). Loading rejects unknown keys and
suggests the nearest valid name; values are coerced to the field's type, and a value that cannot be
coerced is an error naming the dotted key, the value and the expected type.

The package is only the schema, and imports no torch and nothing of the model, PEFT, data or engine
packages, in any call:

- one module per section: ``model`` (with the tiny sizes, BRA and the text embeddings), ``data``, ``train``,
  ``loss``, ``eval`` (and ``output``), ``peft`` (a package: one options module per method), and ``root``
  (:class:`Config`, its cross-section :meth:`Config.check` and :func:`validate`); SLIP's rules across
  sections in ``slip``;
- ``names``: the names the model and PEFT registries register (they check against it);
- ``field`` (``opt``/``section``), ``coerce`` (values to field types), ``checks`` (choices, minimums,
  finite floats), ``load`` (YAML, overrides, renamed keys, what ``samft config show`` prints), ``dump`` (``config.yaml``, hash, the key table of
  ``samft config keys``, the keys ``--resume`` may change), ``protocol`` (samft/autogluon), ``metric_names``.
"""

from __future__ import annotations

from samft.config.checks import check_fields
from samft.config.data import DATA_FORMATS, DataConfig
from samft.config.dump import (RESUMABLE_KEYS, Key, config_hash, config_keys, describe_fields, dump_yaml, flat_dict,
                               resumable_keys, to_dict, yaml_value)
from samft.config.eval import EvalConfig, OutputConfig
from samft.config.field import opt, section
from samft.config.load import (RENAMED, absolute_paths, apply_overrides, config_from_dict, file_beside, load_config,
                               migrate, parse_override, resolved_yaml, safe_yaml, yaml_error)
from samft.config.loss import AuxLossConfig, ClipLossConfig, LossConfig, SetLossConfig, SSLLossConfig
from samft.config.metric_names import METRIC_CHOICES, canonical, task_metric_names
from samft.config.model import BRA_BLOCKS, SLIP_TEMPLATES, BRAConfig, ModelConfig, TextConfig, TinyConfig, TinyHieraConfig
from samft.config.names import ATTENTIONS, FAMILIES, PEFT_METHODS, SAM2_TYPES, SAM_TYPES
from samft.config.peft import PeftConfig
from samft.config.protocol import PROTOCOLS, apply_protocol
from samft.config.root import Config, validate
from samft.config.slip import unused_option_warnings
from samft.config.train import TrainConfig

__all__ = [
    "flat_dict",
    "safe_yaml",
    "ATTENTIONS", "AuxLossConfig", "Key", "absolute_paths", "config_keys", "resolved_yaml", "yaml_value", "BRAConfig", "BRA_BLOCKS", "ClipLossConfig", "Config", "DATA_FORMATS",
    "DataConfig", "EvalConfig", "LossConfig", "METRIC_CHOICES", "ModelConfig", "OutputConfig", "PEFT_METHODS",
    "PROTOCOLS", "PeftConfig", "RENAMED", "RESUMABLE_KEYS", "SAM_TYPES", "SAM2_TYPES", "FAMILIES", "TinyHieraConfig", "SLIP_TEMPLATES", "SSLLossConfig",
    "SetLossConfig", "TextConfig", "TinyConfig", "TrainConfig", "apply_overrides", "apply_protocol", "canonical",
    "check_fields", "config_from_dict", "config_hash", "describe_fields", "dump_yaml", "file_beside", "load_config",
    "migrate",
    "opt", "parse_override", "resumable_keys", "section", "task_metric_names", "to_dict", "unused_option_warnings",
    "validate", "yaml_error",
]
