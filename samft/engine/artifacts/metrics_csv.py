"""``metrics.csv`` (one row per logged step and one per epoch) and ``curves.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from samft.config.metric_names import base_name
from samft.engine.artifacts.fileio import MAX_NUMBER, atomic_write_bytes, atomic_write_text, fail
from samft.files import append_text

KIND = "metrics_csv"
FORMAT = "samft-metrics-csv-1"

STEP_COLUMNS = ["kind", "epoch", "step", "lr", "loss", "task_loss", "grad_norm", "images_per_s", "seconds"]


def metrics_columns(aux_names: list[str], metric_names: tuple[str, ...]) -> list[str]:
    """The columns: step columns, one ``aux_<name>`` per auxiliary/extra loss, one ``val_<metric>`` per metric."""
    return STEP_COLUMNS + [f"aux_{n}" for n in aux_names] + [f"val_{m}" for m in metric_names]


def _check_row(path: Path, n: int, row: dict) -> None:
    if None in row or any(v is None for v in row.values()):
        fail(path, f"row {n}: has {'more' if None in row else 'fewer'} cells than the header (cut short?)")
    if row["kind"] not in ("step", "epoch"):
        fail(path, f"row {n}: field 'kind' is {row['kind'][:20]!r}, expected step or epoch")
    for key, value in row.items():
        if key == "kind" or value == "":
            continue
        try:
            number = float(value)
        except ValueError:
            fail(path, f"row {n}: field {key!r} is {value[:20]!r}, expected a number")
        if abs(number) > MAX_NUMBER and key in ("epoch", "step"):
            fail(path, f"row {n}: field {key!r} is {value[:20]}, expected 0 to {MAX_NUMBER:g}")


def read(path: str | Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` (cells as text), checked: a header with kind/epoch/step, numeric cells."""
    path = Path(path)
    if not path.is_file():
        fail(path, "metrics file not found")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in STEP_COLUMNS[:3] if c not in (reader.fieldnames or [])]
            if missing:
                fail(path, f"field {missing[0]!r} is missing from the header")
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as e:
        fail(path, f"not a readable metrics file ({e})")
    for n, row in enumerate(rows, 1):
        _check_row(path, n, row)
    return rows


read_metrics = read


def write(path: str | Path, columns: list[str], rows: list[dict]) -> None:
    """Write the header and ``rows`` (cells as given, missing ones empty) atomically; :class:`MetricsLog`
    appends to it afterwards."""
    lines = [",".join(columns)] + [",".join(str(r.get(c) or "") for c in columns) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


class MetricsLog:
    """Appends rows as training goes (never through a link: the header's atomic write replaces a link at
    ``metrics.csv``, and a link placed there afterwards is refused in one line). On resume the file is cut back to the rows the saved state had
    written (``keep_rows``; older states: the rows up to ``keep_until_step``), so a row logged after the
    last save is written once, not twice."""

    def __init__(self, path: Path, columns: list[str], enabled: bool, keep_rows: Optional[int] = None,
                 keep_until_step: Optional[int] = None) -> None:
        self.path, self.enabled, self.columns = path, enabled, columns
        self.rows = 0
        if not enabled:
            return
        kept = self._kept(keep_rows, keep_until_step)
        write(path, columns, kept)
        self.rows = len(kept)

    def _kept(self, keep_rows: Optional[int], keep_until_step: Optional[int]) -> list[dict]:
        if (keep_rows is None and keep_until_step is None) or not self.path.is_file():
            return []
        rows: list[dict] = []
        with open(self.path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(row["step"])
                except (KeyError, TypeError, ValueError):
                    continue  # a row cut short by a kill
                if keep_rows is not None and len(rows) >= keep_rows:
                    break
                if keep_rows is not None or step <= keep_until_step:
                    rows.append(self._renamed(row))
        return rows

    def _renamed(self, row: dict) -> dict:
        """A row of an earlier version, which named metrics at 0.5 whatever eval.threshold was (``val_dice@0.5``),
        under this header's names (``val_dice@0.3``): the values carry over."""
        for column in self.columns:
            if column.startswith("val_") and column not in row and f"val_{base_name(column[4:])}" in row:
                row[column] = row[f"val_{base_name(column[4:])}"]
        return row

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (the header was written when the log was opened)."""
        if not self.enabled:
            return
        cells = []
        for c in self.columns:
            v = row.get(c, "")
            cells.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        append_text(self.path, ",".join(cells) + "\n")  # never through a link placed at metrics.csv
        self.rows += 1


def plot_curves(run_dir: Path, metrics_file: str, plot_file: str, metric: str, shown_metrics: tuple[str, ...]) -> None:
    """Training loss per step (loss and task loss, both averaged over the same logging window) and the
    validation metrics per epoch, the selection metric drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(run_dir / metrics_file)
    steps = [r for r in rows if r["kind"] == "step" and r["loss"]]
    epochs = [r for r in rows if r["kind"] == "epoch" and r.get(f"val_{metric}")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [int(r["step"]) for r in steps]
    axes[0].plot(x, [float(r["loss"]) for r in steps], label="loss (total)")
    axes[0].plot(x, [float(r["task_loss"]) for r in steps], label="task loss", alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss (mean over each logging window)")
    if steps:
        axes[0].legend()
    for name in dict.fromkeys(list(shown_metrics) + [metric]):
        values = [(int(r["epoch"]), float(r[f"val_{name}"])) for r in epochs if r.get(f"val_{name}")]
        if values:
            axes[1].plot(*zip(*values), marker="o", label=name, linewidth=2.5 if name == metric else 1)
    axes[1].set_xlabel("epoch")
    axes[1].set_title(f"validation (best by {metric})")
    if axes[1].lines:  # nothing to label before the first validation (train.val_every > 1)
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    atomic_write_bytes(run_dir / plot_file, buf.getvalue())  # replaces a link at curves.png, never its target
