"""train.loggers: TensorBoard and MLflow hold exactly what metrics.csv holds (names, steps, values), read back with
their own readers (tensorboard's EventAccumulator, MlflowClient on the local SQLite store); a kill and --resume
leave every step once; a missing package is one line; a failing tracker is one warning and the training goes on."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.train.loggers import require, scalars
from samft.errors import SamftError

from conftest import tiny_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _cfg(data_dir: Path, run: Path, **train):
    opts = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 0, "progress": False,
            "device": "cpu", "seed": 5, "loggers": ["csv", "tensorboard", "mlflow"], **train}
    return tiny_config("conv_lora", data={"root": str(data_dir), "train": ".", "val_fraction": 0.34},
                       train=opts, output={"dir": str(run)})


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {logged name: [(step, value)]}, in row order."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in read_metrics(run / "metrics.csv"):
        for name, value in scalars(row).items():
            out[name].append((int(row["step"]), value))
    return dict(out)


def tensorboard_scalars(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == f"sqlite:///{run.parent.resolve() / 'mlflow.db'}"  # the default store
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    return client, saved["run_id"]


def mlflow_scalars(client, run_id: str, names):
    from samft.engine.train.loggers.mlflow_log import metric_name

    assert set(client.get_run(run_id).data.metrics) == {metric_name(n) for n in names}
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric_name(n))) for n in names}


def assert_same(logged: dict, csv: dict, where: str) -> None:
    """Same names, the same steps once each, the same values (metrics.csv keeps 6 significant digits,
    TensorBoard float32: relative 1e-5)."""
    assert set(logged) == set(csv), where
    for name, points in csv.items():
        got = logged[name]
        assert [s for s, _ in got] == [s for s, _ in points], f"{where} {name}: steps"
        for (step, a), (_, b) in zip(got, points):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-9), \
                f"{where} {name} at step {step}: {a} != {b}"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    from samft.data.synthetic import write_dataset
    from samft.engine.train.loop import train

    tmp = tmp_path_factory.mktemp("loggers")
    data = write_dataset(tmp / "data", n=12, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small validation set
        return train(_cfg(data, tmp / "runs" / "r"), show_progress=False)


def test_tensorboard_holds_what_metrics_csv_holds(logged_run):
    csv = expected(logged_run)
    assert {"loss", "task_loss", "aux_balance", "lr", "grad_norm", "images_per_s", "seconds", "epoch",
            "epoch_loss", "val_Sm", "val_dice@0.5"} <= set(csv)
    logged, acc = tensorboard_scalars(logged_run)
    assert_same(logged, csv, "tensorboard")
    assert acc.PluginTagToContent("hparams"), "the config as hyper-parameters"
    assert "config" in acc.Tags()["tensors"] or acc.PluginTagToContent("text")
    images = [t for t in acc.Tags()["images"] if t.startswith("val_images/")]
    assert len(images) == 4  # the first four validation images
    validated = [s for s, _ in csv["val_Sm"]]
    for tag in images:
        events = acc.Images(tag)
        assert [e.step for e in events] == validated  # train.log_images_every=1: every validation
        assert events[0].width > 2 * events[0].height  # image | truth | prediction


def test_mlflow_holds_what_metrics_csv_holds(logged_run):
    csv = expected(logged_run)
    client, run_id = mlflow_run(logged_run)
    assert_same(mlflow_scalars(client, run_id, csv), csv, "mlflow")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["train.lr"] == "0.001" and json.loads(run.data.params["train.loggers"]) == \
        ["csv", "tensorboard", "mlflow"]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"adapter", "config.yaml", "metrics.csv", "curves.png", "val_images"} <= artifacts
    assert [f.path for f in client.list_artifacts(run_id, "adapter")] == ["adapter/adapter.safetensors"]
    steps = {f.path for f in client.list_artifacts(run_id, "val_images")}
    assert steps == {f"val_images/step_{s:07d}" for s, _ in csv["val_Sm"]}
    local = Path(client.download_artifacts(run_id, "adapter/adapter.safetensors", str(logged_run.parent / "dl")))
    assert local.read_bytes() == (logged_run / "adapter.safetensors").read_bytes()


def _images_by_step(acc) -> dict[str, dict[int, bytes]]:
    """{tag: {step: encoded image}} of the validation images, asserting each step is there once."""
    out = {}
    for tag in acc.Tags()["images"]:
        events = acc.Images(tag)
        out[tag] = {e.step: e.encoded_image_string for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step twice: {[e.step for e in events]}"
    return out


def test_sigkill_then_resume_logs_every_step_and_image_once(tmp_path):
    """A real process killed between two saves (its trackers hold steps the state does not), then resumed:
    every scalar step once in TensorBoard and MLflow, and the validation images (train.log_images_every=1) at
    each validated step once, those of the saved state's validation drawn again by the restored weights equal
    to the ones drawn before the kill. 10 images: 4 steps an epoch, the state saved at each epoch's end.
    Mutant: the replayed rows not redrawing their validation's images (the saved step's images missing)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from samft.data.synthetic import write_dataset
    from samft.engine.artifacts.state import load_resume_state
    from test_cli_e2e import samft
    from test_kill import _start, _wait_for_step, _workdir

    cwd = _workdir(tmp_path)
    shutil.rmtree(cwd / "data")
    write_dataset(cwd / "data", n=10, seed=2)
    run = cwd / "runs" / "k"
    proc = _start(cwd, "--config", "k.yaml", "train.save_every=0", "train.loggers=[tensorboard,mlflow]",
                  "train.log_images_every=1")
    _wait_for_step(run, 6, proc)  # past the first epoch's validation (step 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = load_resume_state(run / "state.safetensors")["progress"]["step"]
    assert saved and saved % 4 == 0, saved  # an epoch's end, validated
    before, acc = tensorboard_scalars(run)
    assert max(s for s, _ in before["loss"]) > saved, "the kill left steps after the saved state in TensorBoard"
    drawn = {tag: images[saved] for tag, images in _images_by_step(acc).items()}
    assert len(drawn) == 2  # the 2 validation images
    samft("train", "--resume", "runs/k", f"train.max_steps={saved + 4}", "--no-progress", cwd=cwd)
    csv = expected(run)
    assert [s for s, _ in csv["loss"]] == list(range(1, saved + 5))
    logged, acc = tensorboard_scalars(run)
    assert_same(logged, csv, "tensorboard")
    validated = [s for s, _ in csv["val_Sm"]]
    assert validated == list(range(4, saved + 5, 4))
    images = _images_by_step(acc)
    assert images.keys() == drawn.keys()
    for tag, by_step in images.items():
        assert sorted(by_step) == validated, tag
        assert by_step[saved] == drawn[tag], f"{tag}: redrawn after the resume otherwise than before the kill"
    client, run_id = mlflow_run(run)
    assert_same(mlflow_scalars(client, run_id, csv), csv, "mlflow")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run_id, "val_images")} == {
        f"val_images/step_{s:07d}" for s in validated}


def test_a_missing_package_is_one_line(tmp_path, monkeypatch, synthetic_dir):
    from samft.engine.train.loop import train

    for logger, package in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        monkeypatch.setitem(sys.modules, package, None)  # import fails as when it is not installed
        with pytest.raises(SamftError) as e:
            require(["csv", logger])
        assert str(e.value) == (f"train.loggers: {logger} needs the {package} package, which is not installed: "
                                f"pip install 'samft[{logger}]'")
        with pytest.raises(SamftError, match=r"pip install 'samft\[" + logger):
            train(_cfg(synthetic_dir, tmp_path / logger, loggers=[logger]), show_progress=False)
        assert not (tmp_path / logger).exists(), "refused before anything is written"
        monkeypatch.undo()
    require(["csv"])  # csv needs nothing


def test_mlflow_telemetry_is_off(monkeypatch):
    from samft.engine.train.loggers import import_package

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    import_package("mlflow")
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_a_failing_tracker_is_one_warning_and_the_training_goes_on(tmp_path, monkeypatch):
    from samft.data.synthetic import write_dataset
    from samft.engine.train.loggers.tensorboard_log import TensorBoardTracker
    from samft.engine.train.loop import train

    calls = {"n": 0}
    real = TensorBoardTracker.scalars

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(TensorBoardTracker, "scalars", flaky)
    data = write_dataset(tmp_path / "data", n=12, seed=1)
    (tmp_path / "a-file").write_text("")  # a store that cannot be created: under a file
    cfg = _cfg(data, tmp_path / "runs" / "r", epochs=1, mlflow_uri=f"sqlite:///{tmp_path}/a-file/mlflow.db")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(cfg, show_progress=False)
    said = [str(w.message) for w in caught if "train.loggers" in str(w.message)]
    assert len(said) == 2 and all("\n" not in s for s in said), said
    assert said[0].startswith(f"train.loggers: mlflow (sqlite:///{tmp_path}/a-file/mlflow.db) failed (")
    assert "the training goes on" in said[0]
    assert said[1].startswith("train.loggers: tensorboard failed (OSError: [Errno 28] No space left on device)")
    assert [r["kind"] for r in read_metrics(run / "metrics.csv")] == ["step", "step", "epoch"]
    assert (run / "adapter.safetensors").is_file()


def test_validation_image_panels_binary_and_multiclass():
    """image | truth | prediction at PANEL pixels on the longer side; a multi-class truth's ignored pixels are
    drawn as background, not an error."""
    import numpy as np

    from samft.config import config_from_dict
    from samft.data.classes import ClassSpec
    from samft.engine.train.loggers.images import GAP, PANEL, _panel, side_by_side

    image = np.full((50, 100, 3), 128, np.uint8)
    mask = np.zeros((50, 100), np.uint8)
    mask[10:20, 10:30] = 1
    binary = side_by_side([_panel(image, None, None), _panel(image, mask, None), _panel(image, mask, None)])
    assert binary.shape == (PANEL // 2, 3 * PANEL + 2 * GAP, 3) and binary.dtype == np.uint8
    assert not np.array_equal(binary[:, :PANEL], binary[:, PANEL + GAP:2 * PANEL + GAP])  # the mask is drawn
    classes = ClassSpec.of(config_from_dict({"data": {"classes": ["background", "a", "b"]}}).data)
    labels = mask.copy()
    labels[0, :5] = classes.ignore_index
    panel = _panel(image, labels, classes)
    assert panel.shape[1] == PANEL and panel.shape[2] == 3  # with the legend, scaled


def test_overwrite_removes_only_tensorboard_event_files(tmp_path):
    from samft.engine.artifacts.rundir import RunDir

    run = RunDir(tmp_path / "r")
    tb = run.path / "tensorboard"
    tb.mkdir(parents=True)
    (tb / "events.out.tfevents.1.host.1.0").write_bytes(b"x")
    run.init("a: 1\n")
    assert not tb.exists()
    tb.mkdir()
    (tb / "events.out.tfevents.2.host.1.0").write_bytes(b"x")
    (tb / "notes.txt").write_text("mine")
    run.init("a: 1\n")
    assert [p.name for p in tb.iterdir()] == ["notes.txt"]
