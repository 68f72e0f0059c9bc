"""Evaluation/training protocols: samft's own and the reference implementation's (AutoGluon).

``protocol: samft | autogluon`` (a top-level config key, recorded in the run's ``config.yaml``) is one
switch over every option in :data:`OPTIONS`. Each of those options defaults to ``null``, meaning "follow
the protocol"; :func:`apply_protocol` replaces each ``null`` with the protocol's value and leaves an
explicitly set value alone, so ``protocol=autogluon train.adam_eps=1e-8`` is AutoGluon's protocol except
for the optimiser's eps. ``protocol: samft`` gives exactly the values samft used before the switch
existed, so earlier results stay identical.

What AutoGluon does (``autogluon/autogluon``, ``multimodal/src/autogluon/multimodal/``), per option:

- ``data.resize`` squash: every image resized to the square input (bicubic, PIL), the ground truth nearest
  (``data/process_image.py`` ``resize_to_square`` / ``resize_gt_to_square``); samft: longest side + pad.
- ``eval.resize_gt_to_input`` true: scores at the input size against the resized ground truth.
- ``eval.miou`` per_class_all: ``Multiclass_IoU`` (``optim/metrics/semantic_seg_metrics.py``): histograms
  over all classes, an absent class counts as IoU 0, predictions on ignore-labelled pixels enter the union.
- ``eval.ber`` per_image: ``Balanced_Error_Rate``: torchmetrics' sample-wise macro accuracy, mean over images.
- ``loss.class_weight`` / ``mask_bce_weight`` / ``mask_dice_weight`` 1 / 1 / 1: HF ``Mask2FormerLoss.forward``
  returns the terms unweighted and ``optim/lit_semantic_seg.py`` sums them (the configured 10 / 5 / 5 are
  never applied).
- ``loss.set.points`` 12544: mask BCE/Dice on Mask2Former's importance-sampled points (oversample 3,
  importance 0.75), the matcher on as many uniform random points.
- ``loss.set.cost_class`` / ``cost_mask`` / ``cost_dice`` 1 / 5 / 5: ``Mask2FormerLoss`` builds its matcher
  with ``cost_class=1.0`` (hard-coded) and ``Mask2FormerConfig``'s ``mask_weight`` / ``dice_weight`` (5, 5);
  the config's ``class_weight`` 2.0 is not used by the loss.
- ``loss.aux.balance`` 1.0: the Conv-LoRA balance loss is added with weight 1 for every task (the paper's
  text says 2.0 for multi-class, which samft follows).
- ``train.batch_size`` 1 and ``train.accum_steps`` 4: the Conv-LoRA example's ``per_gpu_batch_size`` 1 with
  an effective batch of 4 (so the balance loss sees one image at a time).
- ``train.adam_eps`` 1e-6 (``optim/utils.py`` ``get_optimizer``); samft/PyTorch 1e-8.
- ``train.schedule`` poly: ``polynomial_decay`` with power 1 and end lr 0, which is the same function as
  samft's linear decay (``train.poly_power`` changes the power).

Not switched (documented in the README): fp16 autocast (``env.precision: 16-mixed``; set
``train.precision=fp16`` on a GPU), BER's binarisation at ``prob * 255 > 125``, the backbone (ViT-H in the
paper configs, ``configs/paper/``).

Torch-free: imported by :mod:`samft.config`.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Union

from samft.errors import ConfigError

PROTOCOLS = ("samft", "autogluon")

Value = Union[Any, Callable[[Any], Any]]  # a value, or a function of the config (task-dependent values)

# dotted option -> (samft value, autogluon value), resolved in this order (a later entry may read an
# earlier one: the samft matcher costs follow the loss weights, as they always did).
OPTIONS: dict[str, tuple[Value, Value]] = {
    "data.resize": ("pad", "squash"),
    "eval.resize_gt_to_input": (False, True),
    "eval.miou": ("dataset", "per_class_all"),
    "eval.ber": ("pooled", "per_image"),
    "train.batch_size": (4, 1),
    "train.accum_steps": (1, 4),
    "train.adam_eps": (1e-8, 1e-6),
    "train.schedule": ("linear", "poly"),
    "loss.aux.balance": (lambda cfg: 2.0 if cfg.data.classes else 1.0, 1.0),
    "loss.class_weight": (10.0, 1.0),
    "loss.mask_bce_weight": (5.0, 1.0),
    "loss.mask_dice_weight": (5.0, 1.0),
    "loss.set.points": (0, 12544),
    "loss.set.cost_class": (lambda cfg: cfg.loss.class_weight, 1.0),
    "loss.set.cost_mask": (lambda cfg: cfg.loss.mask_bce_weight, 5.0),
    "loss.set.cost_dice": (lambda cfg: cfg.loss.mask_dice_weight, 5.0),
}


def check_protocol(name: str) -> str:
    """``name`` if it is a protocol, else a ConfigError naming the choices."""
    if name not in PROTOCOLS:
        near = difflib.get_close_matches(str(name), PROTOCOLS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"protocol: {name!r} is not one of {', '.join(PROTOCOLS)}{hint}")
    return name


def _parent(cfg: Any, dotted: str) -> tuple[Any, str]:
    *path, leaf = dotted.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    return node, leaf


def protocol_value(cfg: Any, dotted: str, protocol: str | None = None) -> Any:
    """The value ``protocol`` (default: the config's) gives to option ``dotted`` for this config."""
    value = OPTIONS[dotted][PROTOCOLS.index(check_protocol(protocol or cfg.protocol))]
    return value(cfg) if callable(value) else value


def apply_protocol(cfg: Any) -> Any:
    """Set every option of :data:`OPTIONS` still ``None`` to the value of ``cfg.protocol``; return ``cfg``.

    Explicitly set options (anything but ``None``) are kept. Idempotent: a resolved config is unchanged.
    """
    check_protocol(cfg.protocol)
    for dotted in OPTIONS:
        node, leaf = _parent(cfg, dotted)
        if getattr(node, leaf) is None:
            setattr(node, leaf, protocol_value(cfg, dotted))
    return cfg


def summary(cfg: Any) -> str:
    """One line for a log: ``protocol autogluon``, or with the options set away from it
    ``protocol autogluon, with your train.adam_eps=1e-08 (the protocol's: 1e-06)``."""
    away = differences(cfg)
    if not away:
        return f"protocol {cfg.protocol}"
    return f"protocol {cfg.protocol}, with your " + ", ".join(f"{k}={v} (the protocol's: {p})"
                                                             for k, (v, p) in away.items())


def differences(cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Options where the config differs from its protocol's value: {dotted: (value, protocol's value)}.

    Used to say in a table caption or a log line that a run is "autogluon, except ...".
    """
    out = {}
    for dotted in OPTIONS:
        node, leaf = _parent(cfg, dotted)
        value, expected = getattr(node, leaf), protocol_value(cfg, dotted)
        if value != expected:
            out[dotted] = (value, expected)
    return out
