"""Imports run one way: cli -> engine -> model, peft, prune, data -> config, constants, losses, metrics, tasks.

Checked over the source with ``ast`` (module-level and function-level imports alike), so an import that
runs back up fails here, not in a user's cycle. The exceptions are listed with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "samft"

LAYERS = {  # package or module (under samft.) -> rank; a module may import its own rank or below
    "cli": 3, "__main__": 3, "__init__": 3,
    "engine": 2,
    "model": 1, "peft": 1, "prune": 1, "data": 1, "slip": 1, "tasks": 1,
    "config": 0, "constants": 0, "errors": 0, "progress": 0, "version": 0,
    "files": 0, "deploy_onnx": 0,  # deploy_onnx: numpy + onnxruntime only (tested: no torch)
}
# (importer's top-level name, imported module prefix): why the upward import is right
ALLOWED: dict[tuple[str, str], str] = {}  # none: the config checks registry names against samft/config/names.py
FORBIDDEN_SAME_RANK = {("data", "model"): "data never imports the model", ("data", "peft"): "nor a PEFT method",
                       ("peft", "data"): "a PEFT method knows no dataset"}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
    return [(m, line) for m, line in out if m == "samft" or m.startswith("samft.")]


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        yield ".".join(rel.parts), path


def test_every_package_has_a_layer():
    for module, _ in _sources():
        assert _top(module) in LAYERS, f"{module}: add its package to LAYERS (and to the README's architecture)"


@pytest.mark.parametrize("module,path", list(_sources()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_run_one_way(module, path):
    me = _top(module)
    for target, line in _imports(path):
        if target == "samft":
            continue  # the version string
        them = _top(target)
        allowed = any(me == a and target.startswith(t) for a, t in ALLOWED)
        assert allowed or LAYERS[them] <= LAYERS[me], \
            f"{path.name}:{line} imports {target}: {me} (layer {LAYERS[me]}) must not import {them} (layer {LAYERS[them]})"
        assert (me, them) not in FORBIDDEN_SAME_RANK, f"{path.name}:{line}: {FORBIDDEN_SAME_RANK[(me, them)]}"


def test_config_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, samft.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout.strip()
    assert out == "False"


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: a data module importing the engine is reported (a mutant of the rule)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from samft.engine.train.loop import train\n")
    target, _ = _imports(bad)[0]
    assert LAYERS[_top(target)] > LAYERS["data"]
