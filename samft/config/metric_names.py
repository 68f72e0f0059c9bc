"""Metric names, their aliases and direction: the torch-free, numpy-free name list that ``train.metric``'s
choices come from (the metrics themselves are ``samft.tasks.metrics``')."""

from __future__ import annotations

# name -> (alias, higher is better)
BINARY_METRICS: dict[str, tuple[str, bool]] = {
    "dice@0.5": ("dice", True),
    "iou@0.5": ("iou", True),
    "meanDice": ("mdice", True),
    "meanIoU": ("meaniou", True),
    "maxDice": ("maxdice", True),
    "Sm": ("sm", True),
    "wFm": ("wfm", True),
    "meanEm": ("em", True),
    "maxEm": ("maxem", True),
    "adpEm": ("adpem", True),
    "MAE": ("mae", False),
    "BER": ("ber", False),
}
MULTICLASS_METRICS: dict[str, tuple[str, bool]] = {
    "mIoU": ("miou", True),
    "mAcc": ("macc", True),
    "pixel_acc": ("acc", True),
}
ALL_METRICS = {**BINARY_METRICS, **MULTICLASS_METRICS}
ALIASES = {alias: name for name, (alias, _) in ALL_METRICS.items()}
METRIC_CHOICES = tuple(ALIASES) + tuple(ALL_METRICS)


def canonical(name: str) -> str:
    """The eval.json name of a metric given its name or alias (``sm`` -> ``Sm``)."""
    return ALIASES.get(name, name)


def higher_is_better(name: str) -> bool:
    return ALL_METRICS[canonical(name)][1]


def task_metric_names(multiclass: bool) -> tuple[str, ...]:
    return tuple(MULTICLASS_METRICS if multiclass else BINARY_METRICS)
