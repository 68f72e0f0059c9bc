"""Import-time savings that change nothing a user sees (torch-free, run by ``samft/__init__.py``).

Two packages samft uses run heavy imports in their package ``__init__`` that samft does not need:

- ``segment_anything``'s imports its predictor, which imports torchvision, which imports ``torch._dynamo``:
  about a second for every samft command, though samft uses only ``segment_anything.modeling`` and
  ``build_sam``;
- ``py_sod_metrics``'s imports its context measure, which imports scikit-learn and scikit-image's colour
  module: 2.3 s at the first evaluation (train's first validation, ``samft eval``), though samft uses only
  ``py_sod_metrics.sod_metrics`` (0.3 s).

:func:`defer_package_init` registers such a package without running its ``__init__`` (its submodules import
as usual); the first time anything asks the package itself for a name (``segment_anything.SamPredictor``,
``from py_sod_metrics import Smeasure``), the real ``__init__`` runs and the name is returned, so code beside
samft that uses the package sees no difference.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

DEFERRED = ("segment_anything", "py_sod_metrics")


def _finish(package: ModuleType, spec) -> None:
    """Run the package's real ``__init__`` once (after removing the stand-in ``__getattr__``)."""
    package.__dict__.pop("__getattr__", None)
    spec.loader.exec_module(package)


def defer_package_init(name: str) -> bool:
    """Register the package ``name`` without running its ``__init__``; False when it is already imported or
    not installed (then nothing changes)."""
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)  # __path__ set, body not run

    def __getattr__(attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        _finish(package, spec)
        return getattr(package, attr)

    package.__getattr__ = __getattr__
    sys.modules[name] = package
    return True


def defer_heavy_inits() -> None:
    """:func:`defer_package_init` for each package of :data:`DEFERRED`."""
    for name in DEFERRED:
        defer_package_init(name)
