"""Learning-rate factor per optimizer step (``train.schedule``), for ``torch.optim.lr_scheduler.LambdaLR``.

``linear`` is samft's schedule (the same function as ``lr_factor`` in ``samft/engine/train/loop.py``): linear
warm-up to 1, then linear decay to ``min_ratio`` at ``total`` steps. ``poly`` is AutoGluon's
``polynomial_decay`` (HF's ``get_polynomial_decay_schedule_with_warmup``): after the warm-up,
``min_ratio + (1 - min_ratio) (1 - t)^power`` with ``t`` the fraction of the decay done, ``min_ratio`` =
end lr / lr. AutoGluon's Conv-LoRA runs use power 1 and end lr 0 with no warm-up: exactly the linear
schedule (tested equal). Both use samft's warm-up ``(step + 1) / warmup``.
"""

from __future__ import annotations

SCHEDULES = ("linear", "poly")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "linear",
              power: float = 1.0) -> float:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(min_ratio, 1.0 - frac * (1.0 - min_ratio))
    if schedule == "poly":
        return min_ratio + (1.0 - min_ratio) * max(0.0, 1.0 - frac) ** power
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
