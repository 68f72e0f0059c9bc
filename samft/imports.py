"""Import-time savings that change nothing a user sees (torch-free, run by ``samft/__init__.py``).

``segment_anything``'s package ``__init__`` imports its predictor, which imports torchvision, which imports
``torch._dynamo``: about a second for every samft command, though samft uses only ``segment_anything.modeling``
and ``build_sam``. :func:`defer_segment_anything_init` registers the package without running its
``__init__`` (its submodules import as usual); the first time anything asks the package itself for a name
(``segment_anything.SamPredictor``, ``from segment_anything import sam_model_registry``), the real
``__init__`` runs and the name is returned, so code beside samft that uses the package sees no difference.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def _finish(package: ModuleType, spec) -> None:
    """Run the package's real ``__init__`` once (after removing the stand-in ``__getattr__``)."""
    package.__dict__.pop("__getattr__", None)
    spec.loader.exec_module(package)


def defer_segment_anything_init() -> bool:
    """Register ``segment_anything`` without running its ``__init__``; False when it is already imported or
    not installed (then nothing changes)."""
    if "segment_anything" in sys.modules:
        return False
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)  # __path__ set, body not run

    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        _finish(package, spec)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules["segment_anything"] = package
    return True
