"""MLflow: one MLflow run per training, through ``MlflowClient`` (no global active run).

The store: ``train.mlflow_uri``, or by default a local SQLite file beside the runs
(``sqlite:///<output.dir's parent>/mlflow.db``; the artifacts in ``mlartifacts/`` beside it; ``mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db`` shows them). MLflow 3 refuses a plain folder store
(``mlruns/``) unless ``MLFLOW_ALLOW_FILE_STORE`` is set, and SQLite needs no server. The run id is kept in the
run directory (``trackers.json``, written atomically) so that ``--resume`` continues the same MLflow run.

Metrics are sent once the resumable state holding their rows is saved (:meth:`MlflowTracker.commit`): MLflow
cannot take a value back, so a row logged after the last save and lost with a kill would otherwise be there
twice after the resume. On resume, the rows ``metrics.csv`` kept that the MLflow run lacks are sent.

Metric names are ``metrics.csv``'s, but for ``@`` (which MLflow refuses), written ``_at_``: ``val_dice_at_0.5``
(:func:`metric_name`).

Params: the config's keys (values cut at MLflow's 6000 characters; the whole config is the ``config.yaml``
artifact); artifacts: the best adapter each time it changes (``adapter/``), the validation images
(``val_images/step_<step>/<image>.png``) and, at the end, ``config.yaml``, ``metrics.csv``, ``curves.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from samft.engine.artifacts import trackers as trackers_file
from samft.engine.train.loggers import Images, Tracker, import_package, scalars

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def default_uri(run_dir: Path) -> str:
    """The local store beside the runs: ``sqlite:///<run dir's parent>/mlflow.db``."""
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def artifact_root(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts in a SQLite store (``mlartifacts/`` beside the database, not
    MLflow's default of ``./mlruns`` in the working directory); None for other stores (theirs)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()


def metric_name(name: str) -> str:
    """A metrics.csv column as an MLflow metric name: MLflow refuses ``@``, written ``_at_``
    (``val_dice@0.5`` -> ``val_dice_at_0.5``); any other character it refuses becomes ``_``."""
    name = name.replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 20] + " ... (see config.yaml)"


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_dir: Path, resume: bool) -> None:
        import_package("mlflow")
        from mlflow.tracking import MlflowClient

        self.uri, self.run_dir = uri, Path(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        self.pending: list[Any] = []
        self.run_id = self._resumed_run() if resume else None
        self.starts_empty = self.run_id is None
        if self.starts_empty:
            self.run_id = self._new_run(experiment)

    @property
    def state_path(self) -> Path:
        from samft.engine.artifacts.rundir import TRACKERS_FILE

        return self.run_dir / TRACKERS_FILE

    def _resumed_run(self) -> Optional[str]:
        """The MLflow run this training logged to, reopened; None (and one line) when it is not in this store."""
        import warnings

        saved = trackers_file.read(self.state_path).get("mlflow") if self.state_path.is_file() else None
        if saved is None:
            return None
        if saved["tracking_uri"] != self.uri:
            warnings.warn(f"train.mlflow_uri changed since the run started ({saved['tracking_uri']} -> {self.uri}): "
                          f"logging to a new MLflow run there, with the steps so far", stacklevel=4)
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return saved["run_id"]

    def _new_run(self, experiment: str) -> str:
        from samft.version import __version__

        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None else
                         self.client.create_experiment(experiment, artifact_location=artifact_root(self.uri)))
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"samft.version": __version__, "samft.run_dir": str(self.run_dir.resolve())})
        trackers_file.write(self.state_path, {"mlflow": {"tracking_uri": self.uri, "experiment_id": experiment_id,
                                                         "run_id": run.info.run_id}})
        return run.info.run_id

    def hparams(self, params: dict[str, Any], config_yaml: str, metric: str) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], _param_text(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def scalars(self, step: int, values: dict[str, float], walltime: float) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(metric_name(k), v, int(walltime * 1000), step) for k, v in values.items()]

    def commit(self) -> None:
        self._send(self.pending)
        self.pending = []

    def _send(self, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + METRICS_PER_BATCH])

    def resume(self, kept: list[dict[str, Any]]) -> None:
        """Send the kept rows' values the MLflow run lacks (a kill between a save and its commit, or a new run)."""
        from mlflow.entities import Metric

        rows = [(int(r["step"]), {metric_name(k): v for k, v in scalars(r).items()}) for r in kept]
        names = {name for _, values in rows for name in values}
        have = {name: {m.step for m in self.client.get_metric_history(self.run_id, name)} for name in names}
        now = int(time.time() * 1000)
        self._send([Metric(name, value, now, step) for step, values in rows for name, value in values.items()
                    if step not in have[name]])

    def images(self, step: int, images: Images) -> None:
        for name, image in images:
            self.client.log_image(self.run_id, image, artifact_file=f"val_images/step_{step:07d}/{name}.png")

    def best(self, adapter: Path) -> None:
        self.client.log_artifact(self.run_id, str(adapter), "adapter")

    def close(self, status: str, files: list[Path]) -> None:
        self.pending = []  # rows after the last saved state: a resume logs them again
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)
