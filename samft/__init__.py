"""samft: fine-tune Segment Anything for semantic segmentation (Conv-LoRA first).

The library API (the CLI calls the same functions)::

    import samft
    run_dir = samft.train("configs/demo.yaml", overrides=["train.epochs=2"])   # or a Config / a dict
    results = samft.evaluate(run_dir)                                          # eval.json's content
    seg = samft.Segmenter.from_run(run_dir)
    mask = seg.predict("image.png")                                            # numpy, at the image's size

Importing ``samft`` is cheap: torch loads on first use of these names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from samft.imports import defer_heavy_inits
from samft.version import __version__

defer_heavy_inits()  # segment_anything's predictor (torchvision) and py_sod_metrics' scikit-learn wait until asked for


def _config(config: Any, overrides: Optional[list[str]]) -> Any:
    from samft.config import Config, config_from_dict, load_config

    if isinstance(config, Config):
        if overrides:
            from samft.config import to_dict

            return config_from_dict(to_dict(config), overrides)
        return config
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(config, overrides)


def train(config: Any, overrides: Optional[list[str]] = None, resume: bool = False,
          show_progress: bool = False) -> Path:
    """Train a config (a YAML path, a ``samft.config.Config`` or a dict of sections); returns the run dir.

    ``resume=True`` continues the run in ``config``'s ``output.dir``.
    """
    from samft.engine.train.loop import train as _train

    cfg = _config(config, overrides)
    return _train(cfg, resume=resume, show_progress=show_progress)


def evaluate(run: str | Path, data: Optional[dict[str, str]] = None, device: str = "auto",
             show_progress: bool = False) -> dict:
    """Evaluate a run's best adapter on its test sets (or ``data``: {name: split}); writes and returns eval.json."""
    from samft.engine.infer.evaluate import evaluate_run

    return evaluate_run(run, data, device, show_progress=show_progress)


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from samft.engine.infer.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'samft' has no attribute {name!r}")


__all__ = ["Segmenter", "__version__", "evaluate", "train"]
