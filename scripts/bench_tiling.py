"""Tiled prediction of one large image: images/s, tiles/s and peak memory, against the model alone.

    python scripts/bench_tiling.py [--size 4096] [--tile 192] [--overlap 24] [--device cpu]

Builds the demo model's run (configs/demo.yaml: tiny SAM at 192 px, Conv-LoRA) and a --size x --size
mosaic of synthetic demo images, then in a child process (its own peak RSS, address space capped by
--limit-gb) runs ``samft predict IMAGE --tile`` (``predict_run``: read, tile, predict, blend, write the
PNG) and, on the same tiles, the model alone (one batch of eval.batch_size tiles at a time).
Prints the images/s and tiles/s of both, their ratio (the cost of cutting and blending) and the peak RSS
of the child before and after the tiled prediction, and the peak memory of multi-class tiled prediction (class ids
band by band) against the whole-image class scores. On a GPU: add --device cuda (the command printed
at the end is the same prediction through the CLI).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mosaic(size: int, out: Path) -> Path:
    import numpy as np
    from PIL import Image

    from samft.data.synthetic import write_dataset

    data = write_dataset(out.parent / "pieces", n=16, seed=0)
    pieces = [np.asarray(Image.open(p).convert("RGB").resize((256, 256))) for p in sorted((data / "images").glob("*.png"))]
    h, w = pieces[0].shape[:2]
    rows = [np.concatenate([pieces[(r * 7 + c) % len(pieces)] for c in range(-(-size // w))], 1)
            for r in range(-(-size // h))]
    Image.fromarray(np.concatenate(rows, 0)[:size, :size]).save(out)
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(args) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (args.limit_gb << 30, args.limit_gb << 30))
    import numpy as np
    import torch

    from samft.data.io import read_image
    from samft.engine.infer.predict import predict_run
    from samft.engine.artifacts.loading import load_run
    from samft.data.layouts import Pair
    from samft.engine.infer.tiling import TileGrid, iter_tiled_predictions, model_tile_predictor

    torch.set_num_threads(args.threads)
    run = load_run(args.run, torch.device(args.device))
    before = _rss_mb()
    t0 = time.perf_counter()
    predict_run(args.run, [args.image], Path(args.run) / "pred", device=args.device, show_progress=False,
                tile=args.tile, overlap=args.overlap)
    tiled = time.perf_counter() - t0
    peak = _rss_mb()
    grid = TileGrid(args.size, args.size, args.tile, args.overlap)
    n_tiles = len(grid)
    from samft.tasks.task import make_task

    task = make_task(run.cfg)
    predict = model_tile_predictor(run.model, task, torch.device(args.device))
    batch = run.cfg.eval.batch_size
    image = read_image(args.image)  # the same tiles (Conv-LoRA's cost depends on the experts they pick)
    boxes = [(y, x) for _, _, y, x in grid.boxes()]
    t0 = time.perf_counter()
    for k in range(0, n_tiles, batch):
        predict(np.stack([image[y: y + args.tile, x: x + args.tile] for y, x in boxes[k: k + batch]]))
    model_only = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, scores, _ in iter_tiled_predictions(run.model, [Pair(Path(args.image), None, "x")], args.tile,
                                               args.overlap, batch, torch.device(args.device), task):
        task.labels(scores)
    in_memory = time.perf_counter() - t0
    print(json.dumps({"tiled_s": tiled, "model_only_s": model_only, "in_memory_s": in_memory, "tiles": n_tiles, "rss_before_mb": before,
                      "rss_peak_mb": peak, "threads": torch.get_num_threads()}))


def multiclass_memory(size: int, tile: int, overlap: int, classes: int = 21) -> None:
    """Peak traced memory of multi-class tiled prediction: class ids band by band (``decide_tiled``, what
    predict/eval run) against blending the whole C x H x W scores then taking the argmax (the plain path),
    with a per-pixel linear colour -> class-score predictor standing in for the model (same tiles, same
    blend)."""
    import tracemalloc

    import numpy as np

    from samft.engine.infer.tiling import decide_tiled, predict_tiled

    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mix = np.random.default_rng(1).standard_normal((classes, 3)).astype(np.float32)

    def predict(tiles):
        return np.einsum("kc,nhwc->nkhw", mix, tiles.astype(np.float32) / 255)

    peaks, labels = {}, {}
    for name, run in (("banded", lambda: decide_tiled(image, predict, tile, overlap, 4)),
                      ("plain", lambda: predict_tiled(image, predict, tile, overlap, 4).argmax(0))):
        tracemalloc.start()
        labels[name] = run()
        peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    same = float((labels["banded"] == labels["plain"]).mean())
    print(f"  multi-class ({classes} classes, {size}x{size}, tiles {tile}/{overlap}): peak {peaks['banded']:.0f} MiB "
          f"band by band vs {peaks['plain']:.0f} MiB whole-image scores ({peaks['plain'] / peaks['banded']:.1f}x less; "
          f"class ids equal on {same:.6f} of the pixels)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--overlap", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit-gb", type=int, default=8)
    ap.add_argument("--child", nargs=2, metavar=("RUN", "IMAGE"), help=argparse.SUPPRESS)
    ap.add_argument("--multiclass-only", action="store_true", help="only the multi-class memory comparison")
    args = ap.parse_args()
    if args.child:
        args.run, args.image = args.child
        return child(args)
    if args.multiclass_only:
        return multiclass_memory(args.size, args.tile, args.overlap)

    from bench_predict import make_run

    tmp = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    make_run(tmp / "run", tmp)
    image = _mosaic(args.size, tmp / f"mosaic{args.size}.png")
    cmd = [sys.executable, __file__, "--child", str(tmp / "run"), str(image), "--size", str(args.size),
           "--tile", str(args.tile), "--overlap", str(args.overlap), "--device", args.device,
           "--threads", str(args.threads), "--limit-gb", str(args.limit_gb)]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"{args.size}x{args.size} image, tiles {args.tile} px overlapping {args.overlap} px ({r['tiles']} tiles), "
          f"demo model (tiny SAM 192 px), device {args.device}, {r['threads']} torch thread(s)")
    print(f"  samft predict --tile (load the model, read, tile, predict, blend, write): {r['tiled_s']:.1f} s = "
          f"{1 / r['tiled_s']:.3f} images/s, {r['tiles'] / r['tiled_s']:.1f} tiles/s")
    print(f"  tiled prediction of the loaded model (read, tile, predict, blend):    {r['in_memory_s']:.1f} s = "
          f"{1 / r['in_memory_s']:.3f} images/s, {r['tiles'] / r['in_memory_s']:.1f} tiles/s")
    print(f"  the model alone on the same tiles:                                    {r['model_only_s']:.1f} s = "
          f"{r['tiles'] / r['model_only_s']:.1f} tiles/s")
    print(f"  ratio tiled prediction / model alone: {r['in_memory_s'] / r['model_only_s']:.2f}x")
    print(f"  peak RSS: {r['rss_before_mb']:.0f} MiB after loading the model, {r['rss_peak_mb']:.0f} MiB after the "
          f"tiled prediction (the {args.size}x{args.size} output alone is {args.size ** 2 * 4 / 2**20:.0f} MiB float32)")
    multiclass_memory(args.size, args.tile, args.overlap)
    print(f"  GPU: samft predict IMAGE --run RUN --tile {args.tile} --overlap {args.overlap} --device cuda "
          f"(or: python scripts/bench_tiling.py --size {args.size} --device cuda)")


if __name__ == "__main__":
    main()
