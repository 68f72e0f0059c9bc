"""`samft score` against pysodmetrics and PraNet's definitions; `samft data check` on broken datasets."""

from __future__ import annotations

import json

import numpy as np
import py_sod_metrics as sod
import pytest
import yaml
from PIL import Image

from samft.config import config_from_dict
from samft.data.check import check_data
from samft.data.io import read_binary_mask
from samft.engine.infer.score import score_folders
from samft.errors import SamftError
from samft.tasks.metrics import BinaryMetrics

from conftest import TINY, shared
from test_cli_e2e import samft


def _pranet_mean_dice(pred_u8: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """PraNet's MATLAB loop, restated: mapminmax, then Dice at thresholds 1:-1/255:0 (0 if no overlap)."""
    p = pred_u8 / 255.0
    if p.max() > p.min():
        p = (p - p.min()) / (p.max() - p.min())
    out = []
    for t in np.linspace(1, 0, 256):
        label = p >= t
        inter = np.logical_and(label, gt).sum()
        out.append(0.0 if inter == 0 else 2 * inter / (gt.sum() + label.sum()))
    return np.array(out)


def test_mean_dice_is_pranets_definition():
    rng = np.random.default_rng(3)
    curves = []
    m = BinaryMetrics()
    for i in range(3):
        gt = np.zeros((40, 50), bool)
        gt[5 + i : 25, 10 : 30 + i] = True
        prob = np.clip(gt * 0.6 + rng.uniform(0, 0.5, gt.shape), 0, 1)
        m.update(prob.astype(np.float32), gt)
        curves.append(_pranet_mean_dice(np.round(prob * 255).astype(np.uint8), gt))
    r = m.compute()
    mean_curve = np.mean(curves, axis=0)
    assert r["meanDice"] == pytest.approx(mean_curve.mean(), abs=1e-12)
    assert r["maxDice"] == pytest.approx(mean_curve.max(), abs=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # pysodmetrics on a 1x4 image
def test_ber_hand_computed():
    gt = np.array([[1, 1, 0, 0]], bool)
    prob = np.array([[0.9, 0.2, 0.1, 0.7]], np.float32)  # TP=1 of 2 positives, TN=1 of 2 negatives
    m = BinaryMetrics()
    m.update(prob, gt)
    assert m.compute()["BER"] == pytest.approx(50.0)


@pytest.fixture()
def em_predictions(tmp_path):
    """Degraded predictions of real EM masks, saved as grey PNGs."""
    root = shared("em-cells")
    rng = np.random.default_rng(0)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for i in range(5):
        gt = read_binary_mask(root / "Labels" / f"{i}.png")
        prob = np.clip(gt * 0.65 + rng.uniform(0, 0.5, gt.shape), 0, 1)
        Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(pred_dir / f"{i}.png")
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for i in range(5):
        (gt_dir / f"{i}.png").write_bytes((root / "Labels" / f"{i}.png").read_bytes())
    return pred_dir, gt_dir


def test_score_cli_equals_pysodmetrics_on_real_masks(em_predictions):
    pred_dir, gt_dir = em_predictions
    proc = samft("score", "--pred", str(pred_dir), "--gt", str(gt_dir), "--json", cwd=pred_dir.parent)
    result = json.loads(proc.stdout)
    assert result["n_images"] == 5 and result["resized"] == 0
    sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(), sod.MAE()
    for i in range(5):
        pred = np.asarray(Image.open(pred_dir / f"{i}.png"))
        gt = np.asarray(Image.open(gt_dir / f"{i}.png"))
        for metric in (sm, em, wfm, mae):
            metric.step(pred, gt)
    got = result["metrics"]
    assert got["Sm"] == pytest.approx(sm.get_results()["sm"], abs=1e-12)
    assert got["wFm"] == pytest.approx(wfm.get_results()["wfm"], abs=1e-12)
    assert got["MAE"] == pytest.approx(mae.get_results()["mae"], abs=1e-12)
    assert got["meanEm"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-12)
    assert got["maxEm"] == pytest.approx(em.get_results()["em"]["curve"].max(), abs=1e-12)
    assert got["adpEm"] == pytest.approx(em.get_results()["em"]["adp"], abs=1e-12)


def test_score_accepts_npy_and_resizes(em_predictions, tmp_path):
    pred_dir, gt_dir = em_predictions
    npy_dir = tmp_path / "npy"
    npy_dir.mkdir()
    for p in sorted(pred_dir.glob("*.png")):
        small = np.asarray(Image.open(p).resize((256, 256), Image.BILINEAR)) / 255.0
        np.save(npy_dir / f"{p.stem}.npy", small)
    result = score_folders(npy_dir, gt_dir, show_progress=False)
    assert result["resized"] == 5 and result["n_images"] == 5
    full = score_folders(pred_dir, gt_dir, show_progress=False)
    assert result["metrics"]["Sm"] == pytest.approx(full["metrics"]["Sm"], abs=0.02)


def test_score_errors(em_predictions, tmp_path):
    pred_dir, gt_dir = em_predictions
    (pred_dir / "3.png").unlink()
    with pytest.raises(SamftError, match=r"no prediction for 1 of 5 masks \(first: 3.png\)"):
        score_folders(pred_dir, gt_dir, show_progress=False)
    np.save(pred_dir / "3.npy", np.full((4, 4), 2.0))
    with pytest.raises(SamftError, match=r"3.npy: probabilities must lie in \[0, 1\]"):
        score_folders(pred_dir, gt_dir, show_progress=False)


# ----------------------------------------------------------------------------------------------
# data check
# ----------------------------------------------------------------------------------------------


def _broken_dataset(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for i in range(n):
            img = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
            m = np.zeros((32, 40), np.uint8)
            m[4:20, 5:25] = 255
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(m).save(root / split / "masks" / f"{split}{i}.png")
    data = (root / "train" / "images" / "train1.png").read_bytes()
    (root / "train" / "images" / "train1.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "train" / "masks" / "train2.png")  # size mismatch
    Image.fromarray((np.arange(32 * 40).reshape(32, 40) % 4).astype(np.uint8)).save(
        root / "train" / "masks" / "train3.png")  # class ids, not binary
    (root / "test" / "images" / "test1.png").write_text("not an image")  # corrupt
    return root


def test_data_check_reports_every_problem_with_its_file(tmp_path):
    root = _broken_dataset(tmp_path / "d")
    cfg = config_from_dict({"data": {"root": str(root), "train": "train", "val_fraction": 0.25,
                                     "test": {"T": "test"}, "num_workers": 0}})
    report = check_data(cfg, show_progress=False)
    problems = "\n".join(report.problems)
    assert len(report.problems) == 4, problems
    assert "train1.png: cannot read image" in problems
    assert "train2.png: mask size 40x31 differs from its image" in problems
    assert "train3.png: values [0, 1, 2, 3] look like class ids" in problems
    assert "test1.png: cannot read image" in problems
    quick = check_data(cfg, "quick", show_progress=False)
    assert any("train2.png" in p for p in quick.problems)


def test_data_check_cli_and_train_refuse_broken_data(tmp_path):
    root = _broken_dataset(tmp_path / "d")
    config = {"model": TINY, "data": {"root": str(root), "train": "train", "val_fraction": 0.25,
                                      "num_workers": 0},
              "train": {"epochs": 1, "device": "cpu"}, "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = samft("data", "check", "--config", "c.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "train1.png" in out and "train3.png" in out and "3 problem(s) found" in out
    assert "Traceback" not in out
    proc = samft("train", "--config", "c.yaml", "--no-progress", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "data check found 3 problem(s)" in " ".join(proc.stderr.split())
    assert not (tmp_path / "run" / "config.yaml").exists(), "nothing is written before the data is clean"


def test_data_check_passes_and_warns_about_leakage(tmp_path, synthetic_dir):
    cfg = config_from_dict({"data": {"root": str(synthetic_dir), "train": ".", "test": {"same": "."},
                                     "num_workers": 0}})
    report = check_data(cfg, show_progress=False)
    assert not report.problems
    assert report.warnings == ["test set same shares 24 of its 24 images with the training split"]
    train = report.splits[0].as_dict()
    assert train["pairs"] == 24 and train["mask_values"].startswith("0: ")


def _maps(tmp_path, prob: np.ndarray) -> tuple:
    """One .npy prediction and its 0/255 mask (a square)."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(exist_ok=True)
    gt.mkdir(exist_ok=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(gt / "a.png")
    np.save(pred / "a.npy", prob)
    return pred, gt


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), float("inf")])
def test_score_threshold_outside_0_1_is_refused(tmp_path, threshold):
    pred, gt = _maps(tmp_path, np.full((16, 16), 0.4))
    with pytest.raises(SamftError, match=rf"--threshold {threshold}: expected a probability between 0 and 1"):
        score_folders(pred, gt, threshold, show_progress=False)


def test_score_names_the_threshold_it_used(tmp_path):
    prob = np.zeros((16, 16))
    prob[4:12, 4:12] = 0.4  # foreground at 0.3, nothing at 0.5
    pred, gt = _maps(tmp_path, prob)
    at_03 = score_folders(pred, gt, 0.3, show_progress=False)
    assert at_03["threshold"] == 0.3
    assert {"dice@0.3", "iou@0.3", "BER@0.3"} <= set(at_03["metrics"]), at_03["metrics"]
    assert not {"dice@0.5", "iou@0.5", "BER"} & set(at_03["metrics"])
    assert at_03["metrics"]["dice@0.3"] == pytest.approx(1.0)
    default = score_folders(pred, gt, show_progress=False)["metrics"]
    assert default["dice@0.5"] == pytest.approx(0.0) and "BER" in default


def test_an_all_nan_prediction_is_refused_not_scored_as_empty(tmp_path):
    pred, gt = _maps(tmp_path, np.full((16, 16), np.nan, np.float32))
    with pytest.raises(SamftError, match=r"a.npy: every value of the prediction map is NaN"):
        score_folders(pred, gt, show_progress=False)


def test_npy_predictions_are_checked_before_they_are_loaded(tmp_path):
    """The attack round: a header claiming (200000, 200000) float64 was a 298 GiB allocation and a traceback; an
    object array quoted numpy's allow_pickle hint. Both one line, nothing allocated or unpickled."""
    import numpy as np

    from samft.engine.infer.score import _read_npy
    from samft.errors import DataError

    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (200000, 200000)})
        f.write(b"\0" * 64)
    with pytest.raises(DataError, match=r"huge\.npy: the \.npy is damaged or truncated"):
        _read_npy(huge)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"objects\.npy: the \.npy holds Python objects") as err:
        _read_npy(objects)
    assert "allow_pickle" not in str(err.value)
    good = tmp_path / "good.npy"
    np.save(good, np.full((3, 4), 0.5, np.float32))
    assert _read_npy(good).shape == (3, 4)
