"""Parameter-efficient fine-tuning methods, registered by name.

Every module in this package other than the infrastructure below is a method and is imported here,
so adding a method is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from samft.peft import registry
from samft.peft.registry import MethodSpec, all_methods, get, register

_INFRASTRUCTURE = {"registry", "inject", "placement", "decoder", "quantize"}


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = ["MethodSpec", "all_methods", "get", "register", "registry"]
