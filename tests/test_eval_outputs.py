"""What ``samft eval`` and ``samft predict`` leave for a user to look at: per-image results sorted worst first,
every evaluated set in the table with its own scoring, probability maps. Each test was checked against a
mutant of the code it guards (named in its docstring)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from samft.cli import app
from samft.engine.artifacts import eval_json, per_image_csv
from samft.engine.infer.per_image import per_image_rows
from samft.errors import SamftError
from samft.tasks.metrics import BinaryMetrics, ConfusionMetrics

from conftest import classes_dir
from test_export import make_run


def _invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------- per-image rows

def test_binary_per_image_rows_come_from_the_records_and_sort_worst_first():
    """Mutants: sorting best first; dice taken from the iou record; the threshold name not applied."""
    from samft.data.layouts import Pair
    from pathlib import Path

    m = BinaryMetrics(threshold=0.3)
    gt = np.zeros((16, 16), bool)
    gt[4:12, 4:12] = True
    for name, shift in (("good", 0), ("bad", 6), ("mid", 3)):
        prob = np.roll(gt, shift, axis=1).astype(np.float32)
        m.update(prob, gt, name)
    pairs = [Pair(Path(f"/d/{n}.jpg"), None, n) for n in ("good", "bad", "mid")]
    rows, columns, key = per_image_rows(m, pairs, "dice@0.5")
    assert key == "dice@0.3" and columns == ["dice@0.3", "iou@0.3", "Sm", "MAE"]
    assert [r["image"] for r in rows] == ["bad.jpg", "mid.jpg", "good.jpg"]
    assert rows[-1]["dice@0.3"] == 1.0 and rows[0]["path"] == "/d/bad.jpg"
    for r, k in zip(rows, (1, 2, 0)):  # the records' own values, not recomputed
        assert r["dice@0.3"] == m.records["dice"][k] and r["iou@0.3"] == m.records["iou"][k]
        assert r["Sm"] == m.records["sm"][k] and r["MAE"] == m.records["mae"][k]
    rows, columns, key = per_image_rows(m, pairs, "MAE")  # lower is better: the largest error first
    assert key == "MAE" and columns[0] == "MAE" and [r["image"] for r in rows][0] == "bad.jpg"
    rows, columns, _ = per_image_rows(m, pairs, "BER")  # a metric not among the defaults is added, first
    assert columns == ["BER@0.3", "dice@0.3", "iou@0.3", "Sm", "MAE"]


def test_multiclass_per_image_metrics_over_the_classes_present():
    """Mutants: mIoU over every class (absent ones as 0); pixel accuracy counting ignored pixels; records not
    merged across processes."""
    a, b = ConfusionMetrics(("bg", "cat", "dog")), ConfusionMetrics(("bg", "cat", "dog"))
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 0, 1, 0], [0, 0, 1, 2]])
    a.update(pred, gt, "one")  # bg: tp 4, union 5; cat: tp 2, union 3; dog only on the ignored pixel
    b.update(np.zeros((2, 2), int), np.full((2, 2), 255), "ignored")  # nothing scored: NaN
    a.merge(b)
    first, second = a.per_image()
    assert first["name"] == "one" and first["pixel_acc"] == pytest.approx(6 / 7)
    assert first["mIoU"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert first["mAcc"] == pytest.approx((4 / 4 + 2 / 3) / 2)
    assert second["name"] == "ignored" and math.isnan(second["mIoU"]) and math.isnan(second["pixel_acc"])
    rows, columns, key = per_image_rows(a, [], "mIoU")
    assert columns == ["mIoU", "pixel_acc"] and [r["image"] for r in rows] == ["one", "ignored"]  # NaN last


def test_set_names_become_safe_distinct_file_names():
    """Mutant: the name used as it is (a/b would make a folder, .. would climb out)."""
    assert per_image_csv.set_file_name("val") == "val.csv"
    names = {per_image_csv.set_file_name(n) for n in ("a/b", "a_b", "..", "a b")}
    assert len(names) == 4 and all("/" not in n and not n.startswith(".") for n in names)


def test_a_folder_samft_did_not_create_is_refused(tmp_path):
    """Mutant: prepare_folder without the marker check (writes into a user's folder)."""
    theirs = tmp_path / "eval_per_image"
    theirs.mkdir()
    (theirs / "val.csv").write_text("mine")
    with pytest.raises(SamftError, match="samft did not create it"):
        per_image_csv.prepare_folder(theirs)
    assert (theirs / "val.csv").read_text() == "mine"
    ours = per_image_csv.prepare_folder(tmp_path / "new")
    assert per_image_csv.prepare_folder(ours) == ours  # ours again: fine


# ---------------------------------------------------------------------------------- eval end to end

@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    from samft.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("evalout")
    data = write_dataset(root / "data", n=6, seed=1)
    run, _ = make_run(root / "run", "lora", data={"root": str(data), "train": "."})
    return run, data


def test_eval_writes_per_image_csv_and_prints_the_worst(binary_run):
    """Mutants: no CSV written; rows in evaluation order; the summary without the worst images."""
    run, data = binary_run
    result = _invoke("eval", "--run", run, "--data", f"syn={data}")
    rows = _rows(run / "eval_per_image" / "syn.csv")
    assert len(rows) == 6 and list(rows[0])[:3] == ["image", "path", "Sm"]
    assert {r["image"] for r in rows} == {p.name for p in (data / "images").iterdir()}
    sm = [float(r["Sm"]) for r in rows]
    assert sm == sorted(sm)  # the selection metric (Sm, higher is better): worst first
    entry = json.loads((run / "eval.json").read_text())["sets"]["syn"]
    assert entry["per_image"] == "eval_per_image/syn.csv" and entry["sorted_by"] == "Sm"
    assert [w["image"] for w in entry["worst"]] == [r["image"] for r in rows[:3]]
    line = next(x for x in result.output.splitlines() if x.startswith("worst of syn"))
    assert all(r["image"] in line for r in rows[:3]) and rows[3]["image"] not in line


def test_the_table_shows_every_set_of_eval_json_with_its_own_scoring(binary_run):
    """Mutants: the table of the new sets only (evaluate_run returning this evaluation's results, not the merged
    file); earlier sets' scoring replaced by the new evaluation's; the file-level scoring of the last evaluation
    when the sets differ."""
    run, data = binary_run
    _invoke("eval", "--run", run, "--data", f"first={data}")
    result = _invoke("eval", "--run", run, "--data", f"tiled={data}", "--tile", "48")
    out = " ".join(result.output.split())
    assert "first" in out and "tiled" in out and "earlier" in out
    saved = json.loads((run / "eval.json").read_text())
    assert saved["sets"]["first"]["scoring"] == "original_resolution"
    assert saved["sets"]["tiled"]["scoring"].startswith("original_resolution, tiles 48 px")
    assert saved["scoring"] == eval_json.MIXED
    as_json = json.loads(_invoke("eval", "--run", run, "--data", f"first={data}", "--json").stdout)
    assert set(as_json["sets"]) >= {"first", "tiled"}  # the merged file, as written
    assert as_json["scoring"] == eval_json.MIXED


def test_an_old_entry_without_scoring_takes_its_files(tmp_path):
    """Mutant: old entries left without a scoring (then claimed by the new file-level one)."""
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"scoring": "input_size", "sets": {"old": {"n_images": 1, "metrics": {}}}}))
    merged = eval_json.update(path, {"scoring": "original_resolution", "sets": {"new": {"n_images": 1,
                                                                                        "metrics": {}}}})
    assert merged["sets"]["old"]["scoring"] == "input_size"
    assert merged["sets"]["new"]["scoring"] == "original_resolution" and merged["scoring"] == eval_json.MIXED


def test_an_exported_model_gets_its_per_image_folder_beside_its_eval_json(tmp_path, binary_run):
    """Mutant: per_image_dir in the model's folder (``eval_per_image`` shared by every model there)."""
    from samft.engine.artifacts.rundir import RunDir

    model = tmp_path / "model.pth"
    model.write_bytes(b"")
    assert RunDir(model).per_image_dir == tmp_path / "model.eval_per_image"
    assert RunDir(binary_run[0]).per_image_dir == binary_run[0] / "eval_per_image"


# ------------------------------------------------------------------------------------ predict --probs

def test_binary_probs_npy_and_png16_match_the_masks(binary_run, tmp_path):
    """Mutants: the probabilities not written; png16 scaled to 255 instead of 65535."""
    run, data = binary_run
    images = sorted((data / "images").iterdir())[:3]
    out = tmp_path / "npy"
    _invoke("predict", *images, "--run", run, "--out", out, "--probs", "npy")
    for image in images:
        prob = np.load(out / "probs" / f"{image.stem}.npy")
        mask = np.asarray(Image.open(out / f"{image.stem}.png")) > 0
        assert prob.dtype == np.float16 and prob.shape == mask.shape == Image.open(image).size[::-1]
        assert 0 <= prob.min() and prob.max() <= 1
        assert (np.asarray(prob, np.float32) >= 0.5)[np.abs(prob - 0.5) > 1e-2].tolist() == \
            mask[np.abs(prob - 0.5) > 1e-2].tolist()  # the mask is the thresholded map (away from the edge)
    out16 = tmp_path / "png16"
    _invoke("predict", images[0], "--run", run, "--out", out16, "--probs", "png16")
    with Image.open(out16 / "probs" / f"{images[0].stem}.png") as im:
        assert im.mode == "I;16"
        grey = np.asarray(im).astype(np.float32) / 65535
    np.testing.assert_allclose(grey, np.load(out / "probs" / f"{images[0].stem}.npy").astype(np.float32), atol=2e-3)


def test_probs_are_refused_as_masks_are(binary_run, tmp_path):
    """Mutants: plan_probs not called (an existing probability file replaced without --overwrite); an unknown
    format accepted."""
    run, data = binary_run
    image = sorted((data / "images").iterdir())[0]
    out = tmp_path / "out"
    (out / "probs").mkdir(parents=True)
    (out / "probs" / f"{image.stem}.npy").write_bytes(b"mine")
    result = CliRunner().invoke(app, ["predict", str(image), "--run", str(run), "--out", str(out), "--probs", "npy"])
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (out / "probs" / f"{image.stem}.npy").read_bytes() == b"mine" and not (out / f"{image.stem}.png").exists()
    _invoke("predict", image, "--run", run, "--out", out, "--probs", "npy", "--overwrite")
    assert np.load(out / "probs" / f"{image.stem}.npy").dtype == np.float16
    bad = CliRunner().invoke(app, ["predict", str(image), "--run", str(run), "--out", str(tmp_path / "x"),
                                   "--probs", "tiff"])
    assert bad.exit_code == 2 and "--probs tiff: expected npy or png16" in bad.output


def test_binary_tiled_prediction_writes_probs(binary_run, tmp_path):
    """Mutant: --probs with --tile refused for binary runs too (their tiled prediction has the scores)."""
    run, _ = binary_run
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 110, 3), dtype=np.uint8)).save(big)
    _invoke("predict", big, "--run", run, "--out", tmp_path / "out", "--tile", "64", "--probs", "npy")
    prob = np.load(tmp_path / "out" / "probs" / "big.npy")
    mask = np.asarray(Image.open(tmp_path / "out" / "big.png")) > 0
    assert prob.shape == (150, 110)
    assert ((prob.astype(np.float32) >= 0.5) == mask)[np.abs(prob - 0.5) > 1e-2].all()


@pytest.fixture(scope="module")
def multiclass_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalout_mc")
    data = classes_dir(root / "data")
    run, _ = make_run(root / "run", "lora", model={"num_mask_tokens": 3},
                      data={"root": str(data), "train": ".", "classes": ["bg", "box", "bar"]})
    return run, data


def test_multiclass_probs_class_scores_and_one_png_per_class(multiclass_run, tmp_path):
    """Mutants: png16 of the raw scores (not each class's share); npy of the label map; tiled multi-class
    prediction with --probs not refused before anything is written."""
    run, data = multiclass_run
    image = sorted((data / "images").iterdir())[0]
    _invoke("predict", image, "--run", run, "--out", tmp_path / "npy", "--probs", "npy")
    scores = np.load(tmp_path / "npy" / "probs" / f"{image.stem}.npy").astype(np.float32)
    labels = np.asarray(Image.open(tmp_path / "npy" / f"{image.stem}.png"))
    assert scores.shape == (3, 64, 64)
    top2 = np.sort(scores, axis=0)
    clear = top2[-1] - top2[-2] > 1e-2  # float16 may swap near-ties
    assert (scores.argmax(0) == labels)[clear].all()
    _invoke("predict", image, "--run", run, "--out", tmp_path / "png", "--probs", "png16")
    shares = np.stack([np.asarray(Image.open(tmp_path / "png" / "probs" / image.stem / f"{k}.png"), np.float32)
                       for k in range(3)]) / 65535
    np.testing.assert_allclose(shares.sum(0), 1.0, atol=2e-3)  # each pixel's classes share the whole
    np.testing.assert_allclose(shares, scores / scores.sum(0, keepdims=True), atol=3e-3)
    out = tmp_path / "tiled"
    bad = CliRunner().invoke(app, ["predict", str(image), "--run", str(run), "--out", str(out), "--tile", "32",
                                   "--probs", "npy"])
    assert bad.exit_code == 2 and "--probs with --tile" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_new_training_in_the_run_clears_its_per_image_results_only(tmp_path):
    """Mutant: RunDir.init without per_image_csv.remove (stale CSVs of the earlier run's model stay)."""
    from samft.engine.artifacts.rundir import RunDir

    run = RunDir(tmp_path / "run")
    folder = per_image_csv.prepare_folder(run.per_image_dir)
    per_image_csv.write(folder / "val.csv", [{"image": "a.png", "path": "/a.png", "Sm": 0.5}], ["Sm"])
    run.init("model: {}\n")
    assert not run.per_image_dir.exists()
    theirs = tmp_path / "other" / "eval_per_image"
    theirs.mkdir(parents=True)
    (theirs / "notes.csv").write_text("mine")
    per_image_csv.remove(theirs)  # no marker: not samft's
    assert (theirs / "notes.csv").read_text() == "mine"
