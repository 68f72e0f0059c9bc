"""Tiled prediction: weights sum to 1, one tile = untiled, translation-equivariant models stitch exactly,
bounded memory; ``samft predict/eval --tile``."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from samft.cli import app
from samft.data.layouts import Pair
from samft.engine.infer.evaluate import iter_predictions
from samft.engine.artifacts.loading import load_run
from samft.engine.infer.tiling import (TileGrid, decide_tiled, iter_bands, iter_tiled_predictions, predict_tiled, ramp,
                                 tile_starts)
from samft.tasks.task import LabelMap
from samft.engine.infer.writer import BackgroundWriter

from test_export import make_run


@pytest.mark.parametrize("hw,tile,overlap", [((300, 200), 64, 16), ((64, 64), 64, 8), ((100, 33), 64, 32),
                                             ((257, 129), 64, 0), ((1000, 700), 128, 17), ((65, 300), 32, 3)])
def test_weights_sum_to_one_everywhere(hw, tile, overlap):
    grid = TileGrid(*hw, tile, overlap)
    total = np.zeros(hw)
    for i, j, y, x in grid.boxes():
        w = grid.weight(i, j)
        assert w.shape == grid.tile_hw and (w >= 0).all()
        total[y: y + grid.tile_hw[0], x: x + grid.tile_hw[1]] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_tiles_cover_the_image_with_the_overlap():
    assert tile_starts(300, 64, 16) == [0, 48, 96, 144, 192, 236]
    assert tile_starts(64, 64, 16) == [0] and tile_starts(50, 64, 16) == [0]
    starts = tile_starts(1000, 128, 17)
    assert starts[-1] + 128 == 1000 and all(b - a <= 128 - 17 for a, b in zip(starts, starts[1:]))
    r = ramp(32)
    assert (r[:8] == 0).all() and (r[-8:] == 1).all() and np.all(np.diff(r) >= 0)
    np.testing.assert_allclose(r[8:24] + r[8:24][::-1], 1.0)  # opposite ramps of evenly spaced tiles sum to 1


def _conv_model(radius: int):
    """A translation-equivariant 'model': a (2r+1)^2 conv with zero padding, then a sigmoid -> (N, 2, h, w)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, 2 * radius + 1, 2 * radius + 1, generator=g) * 0.05

    def predict(tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).double() / 255
        return torch.sigmoid(F.conv2d(x, weight.double(), padding=radius)).numpy()

    return predict


@pytest.mark.parametrize("tile,overlap", [(64, 32), (48, 12), (100, 40)])
def test_equivariant_model_stitches_to_the_untiled_result(tile, overlap):
    image = np.random.default_rng(0).integers(0, 256, (250, 190, 3), dtype=np.uint8)
    predict = _conv_model(radius=2)  # overlap // 4 >= 2: a tile's wrong edge pixels get zero weight
    want = predict(image[None])[0]
    got = predict_tiled(image, predict, tile, overlap, batch_size=3)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_edge_artefacts_beyond_the_zero_margin_would_show():
    """The same check fails when the conv reaches further than the zero-weight margin (the test can fail)."""
    image = np.random.default_rng(0).integers(0, 256, (250, 190, 3), dtype=np.uint8)
    predict = _conv_model(radius=5)
    got = predict_tiled(image, predict, 64, 16, batch_size=3)  # margin 4 < radius 5
    assert np.abs(got - predict(image[None])[0]).max() > 1e-4


def _plain_blend(image, predict, tile, overlap):
    """The stitching restated without bands: every tile's weighted scores added into one full-size array."""
    grid = TileGrid(image.shape[0], image.shape[1], tile, overlap)
    th, tw = grid.tile_hw
    out = None
    for i, j, y, x in grid.boxes():
        s = predict(image[None, y: y + th, x: x + tw])[0]
        out = np.zeros(s.shape[:-2] + image.shape[:2]) if out is None else out
        out[..., y: y + th, x: x + tw] += s * grid.weight(i, j)
    return out


@pytest.mark.parametrize("hw,tile,overlap,batch", [((250, 190), 64, 16, 3), ((64, 64), 64, 8, 1),
                                                   ((301, 77), 48, 12, 5), ((100, 400), 64, 0, 2)])
def test_bands_are_final_in_order_and_equal_the_plain_blend(hw, tile, overlap, batch):
    image = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    predict = _conv_model(radius=6)  # reaches past the zero margins: the blend, not the model, is compared
    bands = list(iter_bands(image, predict, tile, overlap, batch))
    tops = [y0 for y0, _ in bands]
    assert tops[0] == 0 and tops == sorted(tops)
    assert all(y0 + b.shape[-2] == nxt for (y0, b), nxt in zip(bands, tops[1:] + [hw[0]]))  # contiguous, to H
    assert all(b.shape[-2] <= tile and b.shape[-1] == hw[1] for _, b in bands)
    want = _plain_blend(image, predict, tile, overlap)
    np.testing.assert_allclose(np.concatenate([b for _, b in bands], axis=-2), want, atol=1e-6)
    np.testing.assert_allclose(predict_tiled(image, predict, tile, overlap, batch), want, atol=1e-6)
    assert np.array_equal(decide_tiled(image, predict, tile, overlap, batch), want.argmax(0))


def test_multiclass_tiling_never_holds_the_class_scores_of_the_image():
    """21 classes on 3000 x 2000: class ids band by band; peak far below C x H x W float32 (504 MB)."""
    c, (h, w), tile = 21, (3000, 2000), 256
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mix = np.random.default_rng(1).standard_normal((c, 3)).astype(np.float32)

    def predict(tiles):  # per-pixel class scores from the colour: the stitched argmax is the untiled one
        return np.einsum("kc,nhwc->nkhw", mix, tiles.astype(np.float32) / 255)

    tracemalloc.start()
    try:
        labels = decide_tiled(image, predict, tile, 64, batch_size=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert labels.shape == (h, w) and labels.dtype == np.uint8
    band = c * tile * w * 4  # one band of class scores: 43 MB
    assert peak < 3 * band + 2 * 2 * c * tile * tile * 4 * 3 + h * w, peak  # bands, tile batches, the labels
    assert peak < c * h * w * 4 / 3
    agree = labels == np.einsum("kc,hwc->khw", mix, image.astype(np.float32) / 255).argmax(0)
    assert agree.mean() > 0.9999  # blended sums of the same scores: ties apart, the same class


def test_memory_is_bounded_by_the_batch_of_tiles():
    """A 4000 x 3000 image: peak allocation = the output + one batch of tiles, not the tiles of the image."""
    image = np.random.default_rng(0).integers(0, 256, (4000, 3000, 3), dtype=np.uint8)

    def predict(tiles):
        return tiles.mean(-1, dtype=np.float32) / 255

    tile, batch = 256, 4
    tracemalloc.start()
    try:
        out = predict_tiled(image, predict, tile, 64, batch_size=batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n_tiles = len(TileGrid(4000, 3000, tile, 64))
    batch_bytes = batch * tile * tile * (3 + 4 + 4 + 4 + 4)  # tiles, scores, weights and their products
    assert out.nbytes == 4000 * 3000 * 4
    overhead = peak - out.nbytes
    assert overhead <= 2 * batch_bytes + (1 << 20), (peak, out.nbytes, batch_bytes)
    assert n_tiles * tile * tile * (3 + 4) > 10 * overhead  # far below holding every tile and its scores
    np.testing.assert_allclose(out, image.mean(-1, dtype=np.float32) / 255, atol=1e-5)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_one_tile_equals_the_untiled_prediction(task, tmp_path):
    sections = dict(data={"classes": ["bg", "a", "b"]}, model={"num_mask_tokens": 5}) if task == "multiclass" else {}
    run, _ = make_run(tmp_path / "run", "conv_lora", **sections)
    loaded = load_run(run, torch.device("cpu"))
    rng = np.random.default_rng(0)
    files = []
    for hw in [(64, 64), (100, 70), (128, 128)]:
        files.append(tmp_path / f"{hw[0]}x{hw[1]}.png")
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(files[-1])
    pairs = [Pair(f, None, f.stem) for f in files]
    from samft.tasks.task import make_task

    task = make_task(loaded.cfg)
    want = {p.name: s for p, s, _ in iter_predictions(loaded.model, pairs, 2, torch.device("cpu"), task)}
    got = {p.name: s for p, s, _ in iter_tiled_predictions(loaded.model, pairs, 128, 16, 2, torch.device("cpu"),
                                                            task)}
    for name in want:
        if task.kind == "multiclass":  # decided band by band: the class ids of the untiled scores
            assert isinstance(got[name], LabelMap)
            assert np.array_equal(task.labels(got[name]), task.labels(want[name])), name
        else:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    if task.kind == "multiclass":  # and the scores themselves, through the same tile predictor
        from samft.data.io import read_image
        from samft.engine.infer.tiling import model_tile_predictor

        predict = model_tile_predictor(loaded.model, task, torch.device("cpu"))
        for f in files:
            np.testing.assert_allclose(predict_tiled(read_image(f), predict, 128, 16), want[f.stem], atol=1e-5)


def test_cli_predict_and_eval_with_tiles(tmp_path, synthetic_dir):
    run, _ = make_run(tmp_path / "run", "lora", data={"root": str(synthetic_dir), "train": "."})
    big = tmp_path / "big" / "big.png"
    big.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 220, 3), dtype=np.uint8)).save(big)
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(big), "--run", str(run), "--out", str(out), "--tile", "96",
                                      "--overlap", "24"])
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output
    mask = np.asarray(Image.open(out / "big.png"))
    assert mask.shape == (300, 220) and set(np.unique(mask)) <= {0, 255}
    bad = CliRunner().invoke(app, ["predict", str(big), "--run", str(run), "--tile", "96", "--overlap", "60"])
    assert bad.exit_code == 2 and "--overlap 60: expected 0 to half the tile (48)" in bad.output
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--data", f"syn={synthetic_dir}", "--tile", "48",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["scoring"] == "original_resolution, tiles 48 px overlapping 6 px"
    assert report["sets"]["syn"]["scoring"] == report["scoring"]
    assert report["sets"]["syn"]["n_images"] == 24


def test_background_writer_runs_every_job_and_raises_errors():
    done = []
    with BackgroundWriter(2, max_pending=2) as writer:
        for i in range(20):
            writer.submit(done.append, i)
    assert sorted(done) == list(range(20))

    def fail(i):
        raise OSError(f"disk full {i}")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(2) as writer:
            writer.submit(fail, 1)


def test_background_loading_and_writing_give_the_same_masks(tmp_path, synthetic_dir):
    from samft.engine.infer.predict import predict_run

    run, _ = make_run(tmp_path / "run", "conv_lora")
    images = str(synthetic_dir / "images")
    plain = predict_run(run, [images], tmp_path / "plain", device="cpu", show_progress=False, workers=0,
                        write_threads=0, with_overlay=True)
    fast = predict_run(run, [images], tmp_path / "fast", device="cpu", show_progress=False, workers=2,
                       write_threads=2, with_overlay=True)
    assert [p.name for p in plain] == [p.name for p in fast] and len(plain) == 24
    for a, b in zip(plain, fast):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert (b.parent / "overlays" / b.name).is_file()
