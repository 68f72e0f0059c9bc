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


# the metrics computed at eval.threshold: their names at another threshold (dice@0.3, iou@0.3, BER@0.3)
THRESHOLD_METRICS = {"dice@0.5": "dice@{t}", "iou@0.5": "iou@{t}", "BER": "BER@{t}"}


def canonical(name: str) -> str:
    """The eval.json name of a metric given its name or alias (``sm`` -> ``Sm``)."""
    return ALIASES.get(name, name)


def at_threshold_name(name: str, threshold: float) -> str:
    """The name of metric ``name`` computed at ``threshold`` (``dice@0.5`` at 0.3 is ``dice@0.3``; the names at
    0.5, the default, and of metrics that take no threshold are kept)."""
    if threshold == 0.5 or name not in THRESHOLD_METRICS:
        return name
    return THRESHOLD_METRICS[name].format(t=f"{threshold:g}")


def base_name(name: str) -> str:
    """The table's name of a metric named at any threshold (``dice@0.3`` -> ``dice@0.5``), or of an alias."""
    head, _, tail = name.partition("@")
    for base, pattern in THRESHOLD_METRICS.items():
        if tail and pattern.startswith(head + "@"):
            return base
    return canonical(name)


def higher_is_better(name: str) -> bool:
    return ALL_METRICS[base_name(name)][1]


def task_metric_names(multiclass: bool) -> tuple[str, ...]:
    return tuple(MULTICLASS_METRICS if multiclass else BINARY_METRICS)
