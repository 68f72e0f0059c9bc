"""The PEFT method registry: one entry per method, looked up by name.

A method lives in one module of ``samft.peft``: its layer(s) and an ``apply(encoder, cfg) -> list[str]``
decorated with :func:`register`; its options dataclass lives, torch-free, in ``samft/config/peft/<method>.py``
(a field of ``samft.config.PeftConfig``) and its name in ``samft.config.names.PEFT_METHODS``: registering
checks both, so the config validates ``peft.method`` without importing this registry. ``apply`` receives SAM's image
encoder with every base parameter already frozen; it wraps the modules it adapts (keeping the original
as ``base_layer``) or unfreezes the base parameters it trains, returns the names of what it adapted,
and raises when nothing matched. Whatever requires grad afterwards is what trains: trainable
parameters are decided by structure, never by guessing names.

A method that trains base parameters themselves (``full``, ``bitfit``) names them with ``trains_base``:
a function of the encoder returning the (encoder-relative) names its structural rule selects. Its
``apply`` unfreezes exactly those, and the tests check that nothing else of the base trains.
``identity_at_init`` says whether a freshly applied method leaves the model's output unchanged (zero-
initialised adapters do; VPT's prompts are extra keys from the start and do not).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

from torch import nn

from samft.config.names import PEFT_METHODS, check_registered
from samft.config.peft import options_class, trains_encoder
from samft.errors import ConfigError

ApplyFn = Callable[[nn.Module, Any], list]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply: ApplyFn
    help: str
    mergeable: bool = False
    merge: Optional[Callable[[nn.Module], int]] = None
    unused_params: bool = False  # some parameters may get no gradient on a step (DDP find_unused_parameters)
    adapts_encoder: bool = True  # False: the method legitimately adapts nothing (decoder_only)
    trains_base: Optional[Callable[[nn.Module], list]] = None  # base encoder params it unfreezes (by structure)
    identity_at_init: bool = True  # a fresh adapter gives the frozen model's output

    def validate(self, cfg: Any, prefix: str) -> None:
        check = getattr(cfg, "check", None)
        if check is not None:
            check(prefix)

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.config_cls)]


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    config_cls: type,
    help: str,
    mergeable: bool = False,
    merge: Optional[Callable[[nn.Module], int]] = None,
    unused_params: bool = False,
    adapts_encoder: bool = True,
    trains_base: Optional[Callable[[nn.Module], list]] = None,
    identity_at_init: bool = True,
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator registering ``apply`` as the PEFT method ``name``."""

    def deco(fn: ApplyFn) -> ApplyFn:
        if name in _METHODS:
            raise RuntimeError(f"PEFT method {name!r} registered twice")
        if mergeable and merge is None:
            raise RuntimeError(f"PEFT method {name!r} is mergeable but has no merge function")
        _check_config(name, config_cls, adapts_encoder or trains_base is not None)
        _METHODS[name] = MethodSpec(name, config_cls, fn, help, mergeable, merge, unused_params, adapts_encoder,
                                    trains_base, identity_at_init)
        return fn

    return deco


def _check_config(name: str, config_cls: type, trains: bool) -> None:
    """What the config declares of the method agrees with its registration (a developer error otherwise)."""
    check_registered("PEFT method", name, PEFT_METHODS)
    if options_class(name) is not config_cls:
        raise RuntimeError(f"PEFT method {name!r} registers {config_cls.__name__}, but samft.config.PeftConfig.{name} "
                           f"is {options_class(name).__name__}")
    if trains_encoder(name) != trains:
        raise RuntimeError(f"PEFT method {name!r}: its options class says trains_encoder={trains_encoder(name)}, "
                           f"its registration {trains} (adapts_encoder or trains_base)")


def get(name: str) -> MethodSpec:
    if name not in _METHODS:
        near = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown PEFT method {name!r}{hint}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def all_methods() -> dict[str, MethodSpec]:
    return dict(_METHODS)
