"""The ``peft`` section: ``peft.method`` picks a method and each method has its own sub-section
(``peft.conv_lora.rank``, ``peft.lora.alpha`` ...), declared in this package's module of the method's name
(torch-free; the method's module in ``samft.peft`` imports it and registers with it). Only the active
method's sub-section is written to a run's ``config.yaml`` (``samft.config.to_dict``).

Adding a method: its options dataclass here (a module and a field of :class:`PeftConfig`), its name in
``samft.config.names.PEFT_METHODS``, its module in ``samft.peft``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any

from samft.config.field import opt, section
from samft.config.names import PEFT_METHODS
from samft.errors import ConfigError
from samft.config.peft.adapter import AdapterConfig
from samft.config.peft.bitfit import BitFitConfig
from samft.config.peft.conv_lora import ConvLoRAConfig
from samft.config.peft.decoder_only import DecoderOnlyConfig
from samft.config.peft.full import FullConfig
from samft.config.peft.hf import HFConfig
from samft.config.peft.lora import LoRAConfig
from samft.config.peft.placement import ALL, canonical_blocks, normalise_blocks
from samft.config.peft.sam_adapter import SAMAdapterConfig
from samft.config.peft.ssf import SSFConfig
from samft.config.peft.vpt import VPTConfig


def _options(cls: type, name: str) -> Any:
    return section(cls, f"options of {name}")


@dataclass
class PeftConfig:
    """The PEFT method, its placement (``blocks``, :mod:`samft.config.peft.placement`) and the options of every
    method (one field per name of ``PEFT_METHODS``, in its order)."""

    method: str = opt("conv_lora", "PEFT method: " + ", ".join(PEFT_METHODS), PEFT_METHODS)
    blocks: str = opt(ALL, "encoder blocks that carry the method: all, late:K (the last K) or a list of block "
                      "indices ([8, 9, 10, 11]); the others stay frozen SAM blocks", normalise=normalise_blocks,
                      hash_default=False)
    adapter: AdapterConfig = _options(AdapterConfig, "adapter")
    bitfit: BitFitConfig = _options(BitFitConfig, "bitfit")
    lora: LoRAConfig = _options(LoRAConfig, "lora")
    conv_lora: ConvLoRAConfig = _options(ConvLoRAConfig, "conv_lora")
    decoder_only: DecoderOnlyConfig = _options(DecoderOnlyConfig, "decoder_only")
    full: FullConfig = _options(FullConfig, "full")
    hf: HFConfig = _options(HFConfig, "hf")
    sam_adapter: SAMAdapterConfig = _options(SAMAdapterConfig, "sam_adapter")
    ssf: SSFConfig = _options(SSFConfig, "ssf")
    vpt: VPTConfig = _options(VPTConfig, "vpt")

    def __post_init__(self) -> None:
        try:
            self.blocks = canonical_blocks(self.blocks)
        except ConfigError:
            pass  # check() names the key and what is accepted

    @property
    def options(self) -> Any:
        """The options section of the active method."""
        return getattr(self, self.method)

    def check(self, prefix: str) -> None:
        """The placement's spelling, then every method's own rules (each section is checked, active or not: their
        defaults are valid)."""
        canonical_blocks(self.blocks, f"{prefix}.blocks")
        for name in PEFT_METHODS:
            check = getattr(getattr(self, name), "check", None)
            if check is not None:
                check(f"{prefix}.{name}")


def trains_encoder(method: str) -> bool:
    """Whether ``method`` trains anything of the image encoder (adapters or base parameters); a method's
    options class says otherwise with ``trains_encoder = False`` (decoder_only)."""
    return getattr(options_class(method), "trains_encoder", True)


def options_class(method: str) -> type:
    """The options dataclass of ``method`` (a name of ``PEFT_METHODS``)."""
    return typing.get_type_hints(PeftConfig)[method]


# the fields that are not a method's options section
PEFT_COMMON = ("method", "blocks")

if tuple(f.name for f in fields(PeftConfig))[len(PEFT_COMMON):] != PEFT_METHODS:
    raise RuntimeError("samft.config.peft.PeftConfig: the common fields, then one field per name of PEFT_METHODS, "
                       "in its order")

__all__ = ["PEFT_COMMON", "AdapterConfig", "BitFitConfig", "ConvLoRAConfig", "DecoderOnlyConfig", "FullConfig", "HFConfig", "LoRAConfig",
           "PeftConfig", "SAMAdapterConfig", "SSFConfig", "VPTConfig", "options_class", "trains_encoder"]
