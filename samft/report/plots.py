"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes.

Text from a run (run labels, class names, set names) is drawn as it is: mathtext is off, so a ``$`` in a class
name is a dollar sign, not a formula that fails to parse.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np


@contextmanager
def figure(ncols: int = 1, width: float = 5.0, height: float = 3.6) -> Iterator:
    """A figure with ``ncols`` axes, drawn without mathtext; yields (fig, axes), closed afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
        try:
            yield fig, list(axes[0])
        finally:
            plt.close(fig)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def curves(runs: list[tuple[str, list[dict], str]]) -> Optional[bytes]:
    """Training loss and learning rate per step, and the validation selection metric per epoch: every run on
    the same axes. ``runs``: (label, metrics.csv rows, selection metric)."""
    if not any(rows for _, rows, _ in runs):
        return None
    with figure(3, width=4.6) as (fig, (loss_ax, lr_ax, val_ax)):
        for n, (label, rows, metric) in enumerate(runs):
            colour = f"C{n % 10}"
            steps = [r for r in rows if r["kind"] == "step" and r.get("loss")]
            x = [float(r["step"]) for r in steps]
            loss_ax.plot(x, [float(r["loss"]) for r in steps], color=colour, label=label)
            lr = [(float(r["step"]), float(r["lr"])) for r in steps if r.get("lr")]
            if lr:
                lr_ax.plot(*zip(*lr), color=colour, label=label)
            val = [(float(r["epoch"]), float(r[f"val_{metric}"])) for r in rows
                   if r["kind"] == "epoch" and r.get(f"val_{metric}")]
            if val:
                val_ax.plot(*zip(*val), marker="o", color=colour, label=f"{label}: {metric}")
        _label(loss_ax, "training loss (mean over each logging window)", "step")
        _label(lr_ax, "learning rate", "step")
        _label(val_ax, "validation (selection metric)", "epoch")
        return png(fig)


def _label(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def pooled_curves(fg: np.ndarray, bg: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel precision, recall and Dice (F1 of the pooled pixels) at each bin's lower edge as the threshold
    (``prob >= t``); precision where nothing is predicted is NaN."""
    bins = len(fg)
    tp = np.cumsum(fg[::-1])[::-1].astype(np.float64)  # foreground pixels with prob >= t
    fp = np.cumsum(bg[::-1])[::-1].astype(np.float64)
    positives = float(fg.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = tp / positives if positives else np.full(bins, np.nan)
        dice = np.where(tp + fp + positives > 0, 2 * tp / (tp + fp + positives), np.nan)
    return {"threshold": np.arange(bins) / bins, "precision": precision, "recall": recall, "dice": dice}


def precision_recall(fg: np.ndarray, bg: np.ndarray, threshold: float) -> bytes:
    """The precision-recall curve of the pooled pixels (the run's threshold marked), and precision, recall and
    Dice against the threshold."""
    c = pooled_curves(fg, bg)
    at = min(int(round(threshold * len(fg))), len(fg) - 1)
    with figure(2) as (fig, (pr_ax, th_ax)):
        pr_ax.plot(c["recall"], c["precision"], color="C0")
        pr_ax.plot([c["recall"][at]], [c["precision"][at]], "o", color="C3", label=f"threshold {threshold:g}")
        pr_ax.set_xlim(0, 1.02)
        pr_ax.set_ylim(0, 1.02)
        pr_ax.set_ylabel("precision")
        _label(pr_ax, "precision-recall (pixels pooled over the set)", "recall")
        for key, colour in (("precision", "C0"), ("recall", "C1"), ("dice", "C2")):
            th_ax.plot(c["threshold"], c[key], color=colour, label=key)
        th_ax.axvline(threshold, color="C3", linestyle="--", linewidth=1)
        th_ax.set_ylim(0, 1.02)
        _label(th_ax, "against the threshold (prob >= t)", "threshold")
        return png(fig)


def distribution(values: list[float], metric: str) -> bytes:
    """A histogram of a per-image metric over the set's images."""
    finite = [v for v in values if v == v]
    with figure(1, width=5.0, height=3.2) as (fig, (ax,)):
        ax.hist(finite, bins=min(20, max(5, len(finite) // 2)), color="C0", edgecolor="white")
        ax.set_ylabel("images")
        ax.set_title(f"{metric} over the images (n={len(finite)})", fontsize=10)
        ax.set_xlabel(metric)
        ax.grid(alpha=0.3)
        return png(fig)


def confusion(matrix: np.ndarray, names: tuple[str, ...]) -> bytes:
    """The confusion matrix, each row (true class) normalised to 1, the shares written in the cells."""
    rows = matrix.sum(1, keepdims=True).astype(np.float64)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    n = len(names)
    side = min(2.5 + 0.5 * n, 12)
    with figure(1, width=side + 1.0, height=side) as (fig, (ax,)):
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels=list(names), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels=list(names), fontsize=8)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion (rows: share of each true class's pixels)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
        return png(fig)


def class_iou(per_class: dict[str, Optional[float]]) -> bytes:
    """A bar per class: its IoU (classes absent from truth and prediction marked n/a)."""
    names = list(per_class)
    values = [v if v is not None else 0.0 for v in per_class.values()]
    with figure(1, width=min(3 + 0.45 * len(names), 14), height=3.4) as (fig, (ax,)):
        bars = ax.bar(range(len(names)), values, color="C0")
        for bar, v in zip(bars, per_class.values()):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, "n/a" if v is None else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("IoU")
        ax.set_title("IoU per class", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        return png(fig)
