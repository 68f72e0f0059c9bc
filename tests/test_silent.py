"""Silence is a bug: a collapsed multi-class model, empty predictions a metric rewards, a tiny validation set,
scores on training images and advice that ignores the run's own learning rate are each said in one warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from samft.engine.train.loop import train
from samft.tasks.metrics import BinaryMetrics, ConfusionMetrics

from conftest import tiny_config


def _cfg(tmp_path, data_dir, name, **train_opts):
    opts = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 0, "progress": False,
            "device": "cpu", "seed": 5, **train_opts}
    return tiny_config("decoder_only", data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                       train=opts, output={"dir": str(tmp_path / name)})


def _said(caught, text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


def test_a_collapse_is_judged_by_the_class_distribution_not_by_a_few_stray_pixels():
    """The 11-class set of the review: one class everywhere but a handful of pixels dodged 'one class'."""
    names = ("void", "sky", "road")
    gt = np.zeros((50, 50), int)
    gt[:20] = 1
    gt[30:] = 2
    pred = np.zeros((50, 50), int)
    pred[0, :3] = 1  # 3 stray pixels of another class
    m = ConfusionMetrics(names)
    m.update(pred, gt, "a")
    kind = m.degenerate()
    assert kind is not None and kind.startswith("collapsed to void") and "3 classes" in kind
    healthy = ConfusionMetrics(names)
    healthy.update(gt, gt, "a")
    assert healthy.degenerate() is None
    mostly = ConfusionMetrics(names)  # truth of one class (a background image): predicting it is right
    mostly.update(np.zeros((50, 50), int), np.zeros((50, 50), int), "b")
    assert mostly.degenerate() == "one class: void"


@pytest.mark.parametrize("lr,expected", [(1e-4, "now 0.0001; e.g. 3e-4 to 1e-3"), (3e-4, "now 0.0003; e.g. 0.0009"),
                                         (1e-3, "now 0.001; e.g. 0.003")])
def test_learning_advice_comes_from_the_runs_own_learning_rate(lr, expected):
    from samft.config import config_from_dict
    from samft.tasks.task import make_task

    hints = make_task(config_from_dict({})).learning_hints(lr)
    assert expected in hints
    assert ("in a new run" in hints) is (lr >= 3e-4)  # --resume cannot change train.lr


def test_empty_predictions_are_not_learning_whatever_the_metric_says(tmp_path, synthetic_dir, monkeypatch):
    """S-measure moves on empty predictions; the run still learnt nothing: said at the end."""
    rising = iter(np.linspace(0.1, 0.9, 10))
    real = BinaryMetrics.compute
    monkeypatch.setattr(BinaryMetrics, "degenerate", lambda self: "empty")
    monkeypatch.setattr(BinaryMetrics, "compute", lambda self: {**real(self), "Sm": float(next(rising))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(tmp_path, synthetic_dir, "empty", metric="sm"), show_progress=False)
    assert _said(caught, "final validation predictions are empty for every image, whatever Sm says")


def test_a_tiny_validation_set_is_said(tmp_path, synthetic_dir):
    cfg = _cfg(tmp_path, synthetic_dir, "tinyval", epochs=1)
    cfg.data.val_fraction = 0.1  # 24 images -> 2 held out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, show_progress=False)
    assert _said(caught, "the validation set has only 2 image(s)")


def test_eval_on_the_training_images_says_how_many(tmp_path, synthetic_dir):
    from samft.engine.infer.evaluate import evaluate_run

    run = train(_cfg(tmp_path, synthetic_dir, "overlap", epochs=1), show_progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_run(run, {"same": str(synthetic_dir)}, device="cpu", show_progress=False)
    assert _said(caught, "eval same: 18 of its 24 images are in the run's training split")


def test_predict_says_a_multiclass_collapse(tmp_path, monkeypatch):
    from samft.engine.infer import predict as predict_mod
    from samft.tasks.task import MultiClassTask

    from conftest import classes_dir

    data = classes_dir(tmp_path / "classes")
    cfg = tiny_config("decoder_only", data={"root": str(data), "train": ".", "val_fraction": 0.25,
                                            "classes": ["background", "a", "b"]},
                      train={"epochs": 1, "batch_size": 2, "progress": False, "device": "cpu"},
                      output={"dir": str(tmp_path / "mc")})
    run = train(cfg, show_progress=False)
    monkeypatch.setattr(MultiClassTask, "labels", lambda self, scores: np.zeros(np.asarray(
        getattr(scores, "labels", scores)).shape[-2:], dtype=np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_mod.predict_run(run, [str(data / "images")], tmp_path / "out", show_progress=False)
    assert _said(caught, "100.0 % of the predicted pixels of all 8 images are 'background'")
