"""Byte-compile what samft imports, once, after an install with ``pip install --no-compile``
(``scripts/_env.sh``).

pip byte-compiles every module of every package it installs: 39 of the core install's 111 s on this machine,
mostly for modules samft never imports (torch alone has thousands). Without ``.pyc`` files, and with
``PYTHONDONTWRITEBYTECODE`` set (as on some machines and CI runners), Python would compile each imported module
from source in every process instead (``import torch`` 1.8 s -> 3.9 s). This script imports every samft module
(those whose optional dependencies are missing are skipped) and the modules samft imports lazily, with
bytecode writing on, so exactly those get their ``.pyc`` files: about 10 s.

    env -u PYTHONDONTWRITEBYTECODE .venv/bin/python scripts/_precompile.py
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import warnings

# imported inside functions (first use), so not reached by importing samft's modules
LAZY = ("torch._dynamo", "py_sod_metrics.sod_metrics", "albumentations", "PIL.PngImagePlugin",
        "PIL.JpegImagePlugin", "scipy.ndimage", "skimage.measure", "skimage.morphology", "safetensors.torch")


def main() -> int:
    sys.dont_write_bytecode = False
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore")
    import samft

    names = [m.name for m in pkgutil.walk_packages(samft.__path__, "samft.") if not m.name.endswith("__main__")]
    skipped = []
    for name in [*names, *LAZY]:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part that is not installed (the core install has no onnx, sam2, ...)
            skipped.append(name)
    print(f"byte-compiled what samft imports ({len(names)} samft modules, {len(skipped)} skipped for "
          f"optional parts not installed) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
