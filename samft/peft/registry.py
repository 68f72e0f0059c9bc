"""The PEFT method registry: one entry per method, looked up by name.

A method lives in one module of ``samft.peft``: its config dataclass, its layer(s), and an
``apply(encoder, cfg) -> list[str]`` decorated with :func:`register`. ``apply`` receives SAM's image
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
        _METHODS[name] = MethodSpec(name, config_cls, fn, help, mergeable, merge, unused_params, adapts_encoder,
                                    trains_base, identity_at_init)
        return fn

    return deco


def get(name: str) -> MethodSpec:
    if name not in _METHODS:
        near = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown PEFT method {name!r}{hint}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def all_methods() -> dict[str, MethodSpec]:
    return dict(_METHODS)
