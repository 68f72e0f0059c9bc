"""Import-time savings (samft.imports) that change nothing a user sees; run in fresh processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          timeout=120).stdout.strip()


def test_the_model_imports_without_segment_anythings_predictor_and_the_package_still_works():
    out = _run("import sys, samft.model\n"
               "print('torchvision' in sys.modules, 'segment_anything.predictor' in sys.modules)\n"
               "import segment_anything\n"
               "from segment_anything import SamPredictor, sam_model_registry\n"
               "print(SamPredictor.__name__, sorted(sam_model_registry), segment_anything.build_sam_vit_b.__name__)")
    assert out.splitlines() == ["False False", "SamPredictor ['default', 'vit_b', 'vit_h', 'vit_l'] build_sam_vit_b"]


def test_segment_anything_imported_first_is_left_as_it_is():
    out = _run("import segment_anything, samft.model\nprint(hasattr(segment_anything, 'SamPredictor'))")
    assert out == "True"


def test_import_from_the_clones_parent_folder_finds_the_package(tmp_path):
    """A clone named samft, Python started in its parent: the package, not the clone as a namespace package
    (scripts/_env.sh installs with editable_mode=compat)."""
    (tmp_path / "samft").symlink_to(ROOT)
    out = subprocess.run([sys.executable, "-c", "import samft; print(samft.__file__)"], capture_output=True,
                         text=True, check=True, cwd=tmp_path, timeout=120).stdout.strip()
    assert out.endswith("samft/__init__.py") and out != "None"


def test_info_on_a_tiny_config_leaves_torch_dynamo_unimported_and_counts_as_the_meta_build():
    """``samft info`` builds a tiny model for real (the meta device's first decomposed op imports torch._dynamo,
    0.6 s); the counts equal those of the structure-only meta build."""
    out = _run("import sys\n"
               "from samft.config import load_config\n"
               "from samft.model import describe, build_model, count_params\n"
               "cfg = load_config('configs/demo.yaml')\n"
               "d = describe(cfg)\n"
               "print('torch._dynamo' in sys.modules)\n"
               "m = count_params(build_model(cfg, meta=True).model)\n"
               "print(d['trainable_params'] == m['trainable_params'], d['total_params'] == m['total_params'])")
    assert out.splitlines() == ["False", "True True"]


def test_binary_metrics_leave_scikit_learn_unimported_and_py_sod_metrics_still_works():
    """The metrics use py_sod_metrics.sod_metrics only (the package's __init__ imports scikit-learn, 2.3 s);
    the package asked for a name afterwards runs its real __init__ and gives the same S-measure."""
    out = _run("import sys, numpy as np\n"
               "from samft.tasks.metrics import BinaryMetrics\n"
               "rng = np.random.default_rng(0)\n"
               "prob, gt = rng.random((40, 50)), rng.random((40, 50)) > 0.6\n"
               "m = BinaryMetrics()\n"
               "m.update(prob, gt, 'a')\n"
               "print('sklearn' in sys.modules, 'py_sod_metrics.context_measure' in sys.modules)\n"
               "import py_sod_metrics\n"
               "sm = py_sod_metrics.Smeasure()\n"
               "sm.step(np.round(prob * 255).astype(np.uint8), gt.astype(np.uint8) * 255)\n"
               "print(float(sm.sms[-1]) == m.records['sm'][0], py_sod_metrics.ContextMeasure.__name__)")
    assert out.splitlines() == ["False False", "True ContextMeasure"]


def test_precompile_writes_bytecode_for_what_samft_imports_even_with_bytecode_writing_off(tmp_path):
    """scripts/_precompile.py (the quick start's install skips pip's compilation): .pyc files for samft's
    modules, torch and the lazily imported ones (torch._dynamo, py_sod_metrics.sod_metrics), with
    PYTHONDONTWRITEBYTECODE=1 as on machines that set it; written under a PYTHONPYCACHEPREFIX here."""
    import os

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "_precompile.py")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "byte-compiled what samft imports" in out.stdout and "0 skipped" in out.stdout
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.pyc")}
    for module in ("samft/cli", "samft/engine/train/loop", "torch/__init__", "torch/_dynamo/__init__",
                   "py_sod_metrics/sod_metrics"):
        assert any(module in w for w in written), module
