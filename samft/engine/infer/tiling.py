"""Tiled prediction of images larger than the model's input, at native resolution.

An image of H x W pixels is cut into ``tile`` x ``tile`` tiles (no downscaling of the image) that
overlap by at least ``overlap`` pixels: along each axis the tiles start every ``tile - overlap``
pixels and the last one ends at the image's edge. Tiles are predicted in batches through a callable
(a batch of tiles -> per-tile probabilities or class scores) and stitched by weighted blending:

- each tile's weight is a product of two 1-D windows. Along a side that borders another tile the
  window rises over the overlap: 0 for the outer quarter of the overlap (whatever a model gets wrong
  near a tile's edge never reaches the output), then a smooth sin^2 ramp to 1; along a side on the
  image's border it is 1. Opposite ramps of evenly spaced tiles sum to 1 (sin^2 + cos^2);
- the windows are divided by their sum over the tiles covering each row / column, which the grid
  makes separable, so the weights of all tiles sum to exactly 1 at every pixel (tested) without an
  image-sized weight array.

The scores are blended band by band (:func:`iter_bands`): only the rows that the current row of tiles
covers are held, plus one batch of tiles and their scores. Binary prediction keeps the H x W
probabilities (the metrics need them); multi-class prediction takes the argmax of each band as it is
finished (:func:`decide_tiled`), so C x H x W class scores are never held. An image no larger than a tile is one tile: the same
prediction as without tiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from samft.data.datasets import load_pair
from samft.data.io import read_image
from samft.data.layouts import Pair
from samft.data.transforms import SamTransform
from samft.errors import SamftError
from samft.engine.infer.segmenter import scores_of_arrays
from samft.model.semantic import SemanticSAM
from samft.tasks.task import LabelMap, Task

TilePredictor = Callable[[np.ndarray], np.ndarray]  # (N, th, tw, 3) uint8 -> (N, th, tw) or (N, C, th, tw)
MIN_TILE = 32


def default_overlap(tile: int) -> int:
    return tile // 8


def check_tiling(tile: Optional[int], overlap: Optional[int]) -> Optional[int]:
    """Validate ``--tile``/``--overlap``; returns the overlap (default ``tile // 8``), None without ``--tile``
    (then ``--overlap`` is refused: it would be ignored)."""
    if tile is None:
        if overlap is not None:
            raise SamftError(f"--overlap {overlap}: only used with --tile SIZE (tiled prediction); add --tile or "
                             f"drop --overlap")
        return None
    if tile < MIN_TILE:
        raise SamftError(f"--tile {tile}: expected at least {MIN_TILE} pixels (or no --tile: whole images)")
    overlap = default_overlap(tile) if overlap is None else overlap
    if not 0 <= overlap <= tile // 2:
        raise SamftError(f"--overlap {overlap}: expected 0 to half the tile ({tile // 2})")
    return overlap


def inference_memory(tile: Optional[int]) -> tuple[str, str]:
    """What an evaluation or a prediction that ran out of memory held, and what to set
    (:func:`samft.engine.runtime.memory_advice`)."""
    batch = "eval.batch_size (in the run's config.yaml)"
    if tile:
        return f"eval.batch_size tiles of {tile} x {tile} px", f"set a smaller --tile or a lower {batch}"
    return ("whole images (each at the run's model.img_size, its mask at the image's full size)",
            f"predict large images by tiles at native resolution (--tile 1024) or set a lower {batch}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: every ``tile - overlap`` pixels, the last tile ending at ``length``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    return [min(i * step, length - tile) for i in range(n)]


def ramp(overlap: int) -> np.ndarray:
    """(overlap,) rising window: 0 over the outer quarter, then sin^2 up to 1 (float64)."""
    margin = overlap // 4
    width = overlap - 2 * margin
    t = (np.arange(overlap) - margin + 0.5) / max(width, 1)
    return np.sin(np.pi / 2 * np.clip(t, 0.0, 1.0)) ** 2


def window(size: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    """(size,) 1-D window of a tile: ramps on the sides that border another tile (``rise``: the start)."""
    w = np.ones(size)
    if overlap > 0:
        r = ramp(min(overlap, size))
        if rise:
            w[: len(r)] = np.minimum(w[: len(r)], r)
        if fall:
            w[size - len(r):] = np.minimum(w[size - len(r):], r[::-1])
    return w


@dataclass
class Axis:
    """The tiles along one axis and their normalised 1-D weights."""

    length: int
    tile: int
    overlap: int
    starts: list[int] = field(init=False)
    weights: list[np.ndarray] = field(init=False)  # per tile (size,), summing to 1 over tiles at each pixel

    def __post_init__(self) -> None:
        self.tile = min(self.tile, self.length)
        self.starts = tile_starts(self.length, self.tile, self.overlap)
        last = len(self.starts) - 1
        raw = [window(self.tile, self.overlap, i > 0, i < last) for i in range(len(self.starts))]
        total = np.zeros(self.length)
        for s, w in zip(self.starts, raw):
            total[s: s + self.tile] += w
        self.weights = [(w / total[s: s + self.tile]).astype(np.float32) for s, w in zip(self.starts, raw)]


class TileGrid:
    """Tiles of an H x W image: ``boxes()`` gives (y, x) starts, ``weight(i, j)`` the (th, tw) weights."""

    def __init__(self, height: int, width: int, tile: int, overlap: int) -> None:
        self.rows, self.cols = Axis(height, tile, overlap), Axis(width, tile, overlap)
        self.height, self.width = height, width
        self.tile_hw = (self.rows.tile, self.cols.tile)

    def __len__(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def boxes(self) -> Iterator[tuple[int, int, int, int]]:
        """(row index, column index, y, x) of every tile, row by row."""
        for i, y in enumerate(self.rows.starts):
            for j, x in enumerate(self.cols.starts):
                yield i, j, y, x

    def weight(self, i: int, j: int) -> np.ndarray:
        return self.rows.weights[i][:, None] * self.cols.weights[j][None, :]


def iter_bands(image: np.ndarray, predict_tiles: TilePredictor, tile: int, overlap: int, batch_size: int = 4
               ) -> Iterator[tuple[int, np.ndarray]]:
    """(H, W, 3) image -> its blended scores band by band, top to bottom: (y0, scores (h, W) or (C, h, W))
    for rows y0 .. y0 + h, each band final when yielded.

    Tiles are predicted row of tiles by row of tiles; when a row of tiles starting at y begins, no later tile
    reaches above y, so the rows above it are done. Only the rows the current row of tiles covers are held
    (C x tile x W), plus one batch of tiles: memory does not grow with the image's height.
    """
    grid = TileGrid(image.shape[0], image.shape[1], tile, overlap)
    th, tw = grid.tile_hw
    buf: Optional[np.ndarray] = None  # the blended scores of rows top .. top + th
    top = 0
    boxes = list(grid.boxes())
    for k in range(0, len(boxes), batch_size):
        batch = boxes[k: k + batch_size]
        tiles = np.stack([image[y: y + th, x: x + tw] for _, _, y, x in batch])
        scores = np.asarray(predict_tiles(tiles), dtype=np.float32)
        if scores.shape[0] != len(batch) or scores.shape[-2:] != (th, tw):
            raise ValueError(f"tile predictor returned {scores.shape} for {len(batch)} tiles of {th}x{tw}")
        for (i, j, y, x), tile_scores in zip(batch, scores):
            if buf is None:
                buf = np.zeros(scores.shape[1:-2] + (th, grid.width), np.float32)
            if y > top:  # a new row of tiles: the rows above it are final
                shift = y - top
                yield top, buf[..., :shift, :].copy()
                buf[..., : th - shift, :] = buf[..., shift:, :]  # numpy copies overlapping slices correctly
                buf[..., th - shift:, :] = 0
                top = y
            buf[..., y - top: y - top + th, x: x + tw] += tile_scores * grid.weight(i, j)
    assert buf is not None and top + th == grid.height
    yield top, buf


def predict_tiled(image: np.ndarray, predict_tiles: TilePredictor, tile: int, overlap: int,
                  batch_size: int = 4) -> np.ndarray:
    """(H, W, 3) image -> blended scores (H, W) or (C, H, W) float32, ``batch_size`` tiles per call."""
    out: Optional[np.ndarray] = None
    for y0, band in iter_bands(image, predict_tiles, tile, overlap, batch_size):
        if out is None:
            out = np.empty(band.shape[:-2] + image.shape[:2], np.float32)
        out[..., y0: y0 + band.shape[-2], :] = band
    return out


def decide_tiled(image: np.ndarray, predict_tiles: TilePredictor, tile: int, overlap: int, batch_size: int = 4
                 ) -> np.ndarray:
    """(H, W, 3) image -> class ids (H, W), the argmax of the blended (C, H, W) scores taken band by band, so
    that the C x H x W scores are never held (uint8 up to 256 classes, else int32)."""
    out: Optional[np.ndarray] = None
    for y0, band in iter_bands(image, predict_tiles, tile, overlap, batch_size):
        if out is None:
            out = np.empty(image.shape[:2], np.uint8 if band.shape[0] <= 256 else np.int32)
        out[y0: y0 + band.shape[-2]] = band.argmax(0)
    return out


def model_tile_predictor(model: SemanticSAM, task: Task, device: torch.device, precision: str = "fp32"
                         ) -> TilePredictor:
    """Tiles through samft's own per-image path (SamTransform, the model, back to the tile's size):
    binary -> foreground probability (N, th, tw); multi-class -> class scores (N, C, th, tw)."""
    transform = SamTransform(model.img_size)

    def predict(tiles: np.ndarray) -> np.ndarray:
        return np.stack(scores_of_arrays(model, task, transform, list(tiles), device, precision))

    return predict


def iter_tiled_predictions(model: SemanticSAM, pairs: list[Pair], tile: int, overlap: Optional[int], batch_size: int,
                           device: torch.device, task: Task, precision: str = "fp32",
                           ) -> Iterator[tuple[Pair, np.ndarray, Optional[np.ndarray]]]:
    """Like ``evaluate.iter_predictions`` (pair, scores at the original size, ground truth or None), each
    image predicted by tiles at native resolution (``overlap`` None: the default). A multi-class task's
    prediction comes decided (:class:`samft.tasks.task.LabelMap`: class ids taken band by band), so memory holds
    one band of C class scores, not C x H x W."""
    overlap = check_tiling(tile, overlap)
    was_training = model.training
    model.eval()
    predict = model_tile_predictor(model, task, device, precision)
    try:
        for pair in pairs:
            image, gt = load_pair(pair, task.classes) if pair.mask is not None else (read_image(pair.image), None)
            if task.decides_in_bands:
                yield pair, LabelMap(decide_tiled(image, predict, tile, overlap, batch_size)), gt
            else:
                yield pair, predict_tiled(image, predict, tile, overlap, batch_size), gt
    finally:
        model.train(was_training)
