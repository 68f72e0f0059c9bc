"""Options of ``peft.method=hf`` (samft/peft/hf.py): one of HF peft's methods on the encoder's linears (torch-free).

``type`` picks the method (:data:`samft.config.names.HF_PEFT_TYPES`), ``options`` is passed to peft's config class
of that type (``r``, ``lora_alpha``, ``init_lora_weights`` ...; checked against the class's fields when the model
is built, where peft is imported). Where the adapters go is samft's to say: ``targets`` and ``peft.blocks`` name
the modules, so the options that would say it otherwise are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samft.config.field import opt
from samft.config.names import HF_PEFT_TYPES
from samft.config.peft.targets import check_targets
from samft.errors import ConfigError

# peft config fields samft sets itself (where the adapters go, what trains besides them, peft's own bookkeeping)
RESERVED = {
    "target_modules": "set from peft.hf.targets and peft.blocks",
    "target_parameters": "set from peft.hf.targets and peft.blocks",
    "exclude_modules": "set from peft.hf.targets and peft.blocks",
    "layers_to_transform": "use peft.blocks",
    "layers_pattern": "use peft.blocks",
    "modules_to_save": "the decoder trains by model.decoder; other modules stay frozen",
    "bias": "biases would train outside peft.blocks; use peft.method=bitfit for biases",
    "peft_type": "set by peft.hf.type",
    "task_type": "peft's bookkeeping, not used by samft",
    "inference_mode": "samft freezes and unfreezes by itself",
    "base_model_name_or_path": "peft's bookkeeping, not used by samft",
    "revision": "peft's bookkeeping, not used by samft",
    "auto_mapping": "peft's bookkeeping, not used by samft",
    "peft_version": "peft's bookkeeping, not used by samft",
}


@dataclass
class HFConfig:
    type: str = opt("lora", "HF peft method: " + ", ".join(HF_PEFT_TYPES) + " (dora: lora with use_dora)",
                    HF_PEFT_TYPES)
    targets: list[str] = opt(["qkv"], "encoder linears to adapt in every block of peft.blocks: qkv, proj, lin1, lin2")
    options: dict[str, Any] = opt({}, "options of peft's config class of the type (e.g. r: 8, lora_alpha: 16 for "
                                  "lora); empty: peft's defaults")

    def check(self, prefix: str) -> None:
        check_targets(self.targets, prefix)
        for key in self.options:
            if key in RESERVED:
                raise ConfigError(f"{prefix}.options.{key}: samft sets it ({RESERVED[key]})")
