"""``hf``: HF peft's methods (``peft.hf.type``: LoRA, DoRA, LoHa, LoKr, OFT, BOFT, IA3, FourierFT, HRA, RandLoRA)
on the encoder's linears, as one method family of samft's registry.

peft's tuner layers are put straight into SAM's image encoder (``peft.inject_adapter_in_model``, with the
encoder-relative names of the modules ``targets`` and ``peft.blocks`` choose as ``target_modules``); the model is
not wrapped in a ``PeftModel``, so samft's model, freezing, adapter file (the trainable tensors, safetensors),
resume and exports treat them as any other method's layers. ``peft.hf.options`` goes to peft's config class of
the type (its fields checked first: an unknown one is named; a value peft refuses is peft's message). Merging
(``samft export --merged``) is peft's own ``merge()`` of each layer, which then gives way to its base layer.

Not offered, with peft 0.21: VeRA, VB-LoRA, PVeRA, TinyLoRA, UniLoRA and FRoD keep state shared across layers on
peft's tuner model, and ``inject_adapter_in_model`` refuses them; AdaLoRA reallocates its ranks from the
training loop (``update_and_allocate``); prompt and prefix tuning, X-LoRA, Poly and CPT are not layers on an
``nn.Linear``. OFT's layer reshapes its input as at most 3-D: SAM's encoder linears see (B, H, W, C), so samft
flattens the middle dimensions around it (two forward hooks). FourierFT starts from a random spectrum
(``init_weights: false``, peft's default), so it does not start as the frozen model; the other types do.

On a quantised encoder (``model.quantize``) peft wraps bitsandbytes' layers as it wraps ``nn.Linear``; the types
that only call their base layer (``samft.config.model.HF_QUANTIZABLE_TYPES``) then compute with the de-quantised
weight, and merging runs after the exports have de-quantised the base (tested equal).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any

import torch
from torch import nn

from samft.config.peft.hf import HFConfig
from samft.errors import ConfigError
from samft.peft.inject import flatten_input, linear_targets, placed_modules, set_module
from samft.peft.registry import register

INSTALL = "pip install 'samft[peft]'"

# peft.hf.type -> (peft's PeftType name, options samft defaults, options the type fixes)
TYPES: dict[str, tuple[str, dict, dict]] = {
    "lora": ("LORA", {}, {}),
    "dora": ("LORA", {}, {"use_dora": True}),
    "loha": ("LOHA", {}, {}),
    "lokr": ("LOKR", {}, {}),
    "oft": ("OFT", {}, {}),
    "boft": ("BOFT", {}, {}),
    "ia3": ("IA3", {"feedforward_modules": []}, {}),  # SAM's qkv is no feed-forward layer; options may name some
    "fourierft": ("FOURIERFT", {}, {}),
    "hra": ("HRA", {}, {}),
    "randlora": ("RANDLORA", {}, {}),
}
_FLATTEN = ("oft",)  # types whose layer takes at most 3-D input


def require_peft() -> Any:
    """The ``peft`` package, or a one-line ConfigError saying what to install."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"peft.method=hf needs HF peft, which is not installed: {INSTALL}") from None
    return peft


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def config_class(hf_type: str) -> type:
    """peft's config class of ``hf_type``."""
    require_peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[TYPES[hf_type][0]]


def peft_config(cfg: HFConfig, target_modules: list[str]) -> Any:
    """peft's config of ``cfg.type`` with ``cfg.options`` (each checked against the class's fields) on
    ``target_modules``; a one-line ConfigError naming the option or giving peft's message."""
    cls = config_class(cfg.type)
    _, defaults, fixed = TYPES[cfg.type]
    fields = sorted(f.name for f in dataclasses.fields(cls))
    for key in cfg.options:
        if key in fixed and cfg.options[key] != fixed[key]:
            raise ConfigError(f"peft.hf.options.{key}: peft.hf.type={cfg.type} sets it to {fixed[key]!r}")
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"peft.hf.options.{key}: not an option of peft's {cls.__name__} "
                              f"(peft.hf.type={cfg.type}){hint}")
    try:
        return cls(**{**defaults, **cfg.options, **fixed, "target_modules": list(target_modules)})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"peft.hf.options (peft.hf.type={cfg.type}): peft refuses them: {_one_line(e)}") from None


def tuner_layers(root: nn.Module) -> list[str]:
    """The names of peft's tuner layers under ``root`` (outermost only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n for n, m in root.named_modules() if isinstance(m, BaseTunerLayer)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _inject(config: Any, root: nn.Module, hf_type: str) -> None:
    peft = require_peft()
    try:
        peft.inject_adapter_in_model(config, root)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"peft.hf.options (peft.hf.type={hf_type}): peft refuses them on these layers: "
                          f"{_one_line(e)}") from None


def _inject_on_meta(config: Any, encoder: nn.Module, names: list[str], hf_type: str) -> None:
    """The structure of peft's layers on a meta-device encoder: each distinct (in, out, bias) layer is built once
    on the CPU (some types initialise from the weight's values: BOFT, PiSSA), moved to the meta device and given
    the encoder's own base layer; the parameter counts are those of a real build."""
    built: dict[tuple, nn.Module] = {}
    for name in names:
        base = encoder.get_submodule(name)
        key = (base.in_features, base.out_features, base.bias is not None, base.weight.dtype)
        if key not in built:
            with torch.device("cpu"):  # build_model(meta=True) opens the meta device around apply
                holder = nn.Module()
                holder.layer = nn.Linear(key[0], key[1], bias=key[2], dtype=key[3]).requires_grad_(False)
                _inject(dataclasses.replace(config, target_modules=["layer"]), holder, hf_type)
            built[key] = holder.layer.to("meta")
        layer = copy.deepcopy(built[key])
        layer.base_layer = base
        set_module(encoder, name, layer)


def merge(encoder: nn.Module) -> int:
    """peft's own ``merge()`` of every tuner layer, which then gives way to its (merged) base layer; returns how
    many were merged."""
    names = tuner_layers(encoder)
    for name in names:
        layer = encoder.get_submodule(name)
        layer.merge()
        set_module(encoder, name, layer.get_base_layer())
    return len(names)


@register("hf", HFConfig, help="HF peft's methods (peft.hf.type) on encoder linears (mergeable: peft's merge)",
          mergeable=True, merge=merge)
def apply(encoder: nn.Module, cfg: HFConfig) -> list[str]:
    require_peft()
    names = placed_modules(encoder, linear_targets(cfg.targets), "hf", f"targets {cfg.targets} (peft.hf.type={cfg.type})")
    config = peft_config(cfg, names)
    trainable = [p for p in encoder.parameters() if p.requires_grad]  # peft freezes all but its own: kept as were
    if next(encoder.parameters()).is_meta:
        _inject_on_meta(config, encoder, names, cfg.type)
    else:
        _inject(config, encoder, cfg.type)
    for p in trainable:
        p.requires_grad_(True)
    adapted = tuner_layers(encoder)
    if sorted(adapted) != sorted(names):
        raise RuntimeError(f"peft.hf ({cfg.type}): peft adapted {adapted[:3]}, samft asked for {names[:3]}")
    if cfg.type in _FLATTEN:
        for name in names:
            flatten_input(encoder.get_submodule(name), 3)
    return names
