"""The layout's rules, checked over the source with ``ast`` (module-level and function-level imports alike).

Dependencies run one way (``docs/architecture.md``)::

    cli -> report -> engine -> model, peft, prune, slip -> tasks -> data -> config, constants, errors, files, progress, version

- a module imports its own layer or lower; ``config`` imports nothing above it, in any call (no exceptions);
- within a layer: data never imports the model or a PEFT method, a PEFT method knows no dataset, the model knows
  no dataset;
- the engine's rooms: ``artifacts`` (the run directory and every file kind) is readable without the training or
  the inference code, and ``infer`` runs without the training code;
- no import cycle between packages (function-level imports count: a cycle broken by a late import is a cycle);
- no function in ``samft/`` over 60 lines or of cyclomatic complexity over 15 (:func:`complexity`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "samft"

LAYERS = {  # top-level package or module under samft. -> rank; a module may import its own rank or below
    "cli": 6, "__main__": 6, "__init__": 6,
    "report": 5,  # samft report: reads runs and predicts through the engine
    "engine": 4,
    "model": 3, "peft": 3, "prune": 3, "slip": 3,
    "tasks": 2,
    "data": 1,
    "config": 0, "constants": 0, "errors": 0, "files": 0, "imports": 0, "progress": 0, "version": 0,
    "deploy_onnx": 0,  # numpy + onnxruntime only (tested: no torch)
}
FORBIDDEN = {  # (importer, imported) -> why; both are top-level names or engine rooms ("engine.train" ...)
    ("data", "model"): "data never imports the model",
    ("data", "peft"): "nor a PEFT method",
    ("peft", "data"): "a PEFT method knows no dataset",
    ("model", "data"): "the model knows no dataset",
    ("engine.artifacts", "engine.train"): "run files are readable without the training code",
    ("engine.artifacts", "engine.infer"): "run files are readable without the inference code",
    ("engine.infer", "engine.train"): "inference runs without the training code",
    ("report", "engine.train"): "a report reads runs and predicts; it never runs the training code",
}
MAX_LINES = 60
MAX_COMPLEXITY = 15


def _unit(module: str) -> str:
    """The package a module belongs to for the rules: its top-level name, or the engine room."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if parts[1] == "engine" and len(parts) > 3:
        return f"engine.{parts[2]}"
    return parts[1]


def _top(unit: str) -> str:
    return unit.split(".")[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``samft`` module imported anywhere in the file (``from samft import peft`` names samft.peft)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "samft":
                out += [(f"samft.{alias.name}", node.lineno) for alias in node.names]
            else:
                out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
    return [(m, line) for m, line in out if m.startswith("samft.")]


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
        yield ".".join(parts), path


def _violations(module: str, path: Path) -> list[str]:
    me, out = _unit(module), []
    for target, line in _imports(path):
        them = _unit(target)
        if _top(them) not in LAYERS:
            continue  # e.g. "samft.__version__" style attribute imports never happen; unknown names fail below
        if LAYERS[_top(them)] > LAYERS[_top(me)]:
            out.append(f"{path.name}:{line} imports {target}: {me} (layer {LAYERS[_top(me)]}) must not import "
                       f"{them} (layer {LAYERS[_top(them)]})")
        for a, b in {(me, them), (_top(me), _top(them))}:
            if (a, b) in FORBIDDEN:
                out.append(f"{path.name}:{line} imports {target}: {FORBIDDEN[(a, b)]}")
    return out


def test_every_package_has_a_layer():
    for module, _ in _sources():
        assert _top(_unit(module)) in LAYERS, f"{module}: add its package to LAYERS (and to docs/architecture.md)"


@pytest.mark.parametrize("module,path", list(_sources()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_run_one_way(module, path):
    assert _violations(module, path) == []


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, path in _sources():
        me = _unit(module)
        for target, _ in _imports(path):
            them = _unit(target)
            if them != me:
                edges.setdefault(me, set()).add(them)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    assert _cycles(_graph()) == []


def complexity(fn: ast.AST) -> int:
    """McCabe's number as radon counts it, closely enough: 1 + one per branch point (if, for, while, except,
    assert, conditional expression, comprehension, match case) + one per extra operand of ``and``/``or``.
    Nested functions count towards the enclosing one (they are part of what a reader must hold)."""
    n = 1
    for node in ast.walk(fn):
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp, ast.ExceptHandler, ast.Assert,
                             ast.comprehension, ast.match_case)):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
    return n


def _too_big(source: str, name: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES or complexity(node) > MAX_COMPLEXITY:
                out.append(f"{name}:{node.lineno} {node.name}: {lines} lines, complexity {complexity(node)}")
    return out


@pytest.mark.parametrize("module,path", list(_sources()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_functions_are_small(module, path):
    assert _too_big(path.read_text(), str(path.relative_to(PKG.parent))) == []


def test_the_checks_catch_their_mutants(tmp_path):
    """The checkers themselves: an upward import, a forbidden pair, a room rule, a cycle and an oversized
    function are each reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from samft.engine.train.loop import train\n    from samft.model import build_model\n")
    assert len(_violations("samft.data.bad", bad)) == 3  # two upward imports, one of them a forbidden pair too
    bad.write_text("from samft.data.io import read_image\n")
    assert _violations("samft.model.bad", bad) != []  # downward but forbidden: the model knows no dataset
    bad.write_text("from samft.engine.train.setup import x\n")
    assert _violations("samft.engine.artifacts.bad", bad) != []
    bad.write_text("from samft import config\n")
    assert _violations("samft.data.bad", bad) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(15))
    assert _too_big(f"def f(x):\n{branches}\n    return -1\n", "m") != []  # complexity 16
    assert _too_big("def f(x):\n" + "    x += 1\n" * 60, "m") != []  # 61 lines
    assert _too_big("def f(x):\n" + "    x += 1\n" * 59, "m") == []


def test_config_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, samft.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout.strip()
    assert out == "False"


def test_nothing_imports_the_package_root():
    """``samft/__init__.py`` is the library API and imports the engine: ``from samft import peft`` inside the
    package would make engine/model -> samft -> engine a cycle. Import the module itself (``import samft.peft``)."""
    found = []
    for module, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "samft" and node.level == 0:
                found.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name == "samft" for a in node.names):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
