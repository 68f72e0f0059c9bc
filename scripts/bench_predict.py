"""Prediction throughput on a folder: the plain path against the optimised one, measured in the same run.

    python scripts/bench_predict.py [--n 200] [--repeats 3] [--workers 2] [--device cpu]

Makes ``--n`` synthetic images (``samft demo-data``) and a run of the demo model (configs/demo.yaml:
tiny SAM at 192 px, Conv-LoRA; random adapter weights: the speed is that of a trained run), then times
``predict_run`` on the folder (model loading included, as ``samft predict`` reports it):

- plain: images decoded in the main process (``workers=0``), each mask encoded and written before the
  next batch (``write_threads=0``): samft's prediction before background loading and writing;
- optimised: ``--workers`` DataLoader processes decode, threads encode and write the PNGs.

Prints the median images/s of each and their ratio; checks the masks are identical. Then, against the bare
batched forward pass (the model on the same images already decoded, resized and batched in memory, eval batch
size: what no prediction can beat), the time of ``predict_run`` in process (optimised) and of the whole
``samft predict`` command in a fresh process (start-up and model loading included), as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_run(run_dir: Path, data_dir: Path):
    from samft.config import dump_yaml, load_config
    from samft.engine.artifacts.adapter import save_adapter, adapter_expectations
    from samft.engine.artifacts.rundir import ADAPTER_FILE, CONFIG_FILE
    from samft.model import build_model

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data_dir}", f"output.dir={run_dir}"])
    built = build_model(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    save_adapter(built.model, run_dir / ADAPTER_FILE, adapter_expectations(cfg, built.base_sha256, built.model))
    return cfg


def bare_forward_s(run_dir: Path, images: Path, device: str) -> float:
    """Seconds of the model's batched forward on every image of ``images``, decoded and batched beforehand."""
    import torch
    from torch.utils.data import DataLoader

    from samft.data.datasets import EvalDataset, collate
    from samft.data.layouts import Pair
    from samft.engine.artifacts.loading import load_run
    from samft.tasks.task import make_task

    run = load_run(run_dir, torch.device(device))
    pairs = [Pair(f, None, f.stem) for f in sorted(images.iterdir())]
    task = make_task(run.cfg)
    data = EvalDataset(pairs, run.model.img_size, task.classes, run.cfg.data.resize)
    batches = [b["image"].to(device) for b in DataLoader(data, batch_size=run.cfg.eval.batch_size, collate_fn=collate)]
    run.model.eval()
    with torch.no_grad():
        run.model(batches[0])  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            torch.sigmoid(run.model(b).masks)
        return time.perf_counter() - t0


def against_forward(tmp: Path, images: str, device: str, repeats: int) -> None:
    """Median seconds of the bare forward, predict_run in process and the samft predict command; ratios."""
    import subprocess

    from samft.engine.infer.predict import predict_run

    times: dict[str, list[float]] = {"bare forward": [], "predict_run": [], "samft predict": []}
    for r in range(repeats):
        times["bare forward"].append(bare_forward_s(tmp / "run", Path(images), device))
        t0 = time.perf_counter()
        predict_run(tmp / "run", [images], tmp / f"inproc{r}", device=device, show_progress=False)
        times["predict_run"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "samft", "predict", "--run", str(tmp / "run"), images, "--out",
                        str(tmp / f"cmd{r}"), "--device", device], check=True, capture_output=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        times["samft predict"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:14s} {v:6.2f} s   x{v / med['bare forward']:.2f} of the bare forward   runs: "
              f"{', '.join(f'{x:.2f}' for x in times[k])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from samft.data.synthetic import write_dataset
    from samft.engine.infer.predict import predict_run

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    data = write_dataset(tmp / "data", n=args.n, seed=0)
    make_run(tmp / "run", data)
    images = str(data / "images")
    paths = {"plain": dict(workers=0, write_threads=0), "optimised": dict(workers=args.workers)}
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(args.repeats):
        for name, kw in paths.items():
            out = tmp / f"{name}{r}"
            t0 = time.perf_counter()
            written = predict_run(tmp / "run", [images], out, device=args.device, show_progress=False, **kw)
            rates[name].append(len(written) / (time.perf_counter() - t0))
    for f in sorted((tmp / "plain0").glob("*.png")):
        if not np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp / "optimised0" / f.name))):
            raise SystemExit(f"masks differ: {f.name}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.n} images, demo model (tiny SAM 192 px), device {args.device}, {torch.get_num_threads()} torch "
          f"thread(s), median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:10s} {v:7.1f} images/s   runs: {', '.join(f'{x:.1f}' for x in rates[k])}")
    print(f"  ratio optimised/plain: {med['optimised'] / med['plain']:.2f}x (masks identical)")
    print("against the bare batched forward (median seconds):")
    against_forward(tmp, images, args.device, args.repeats)


if __name__ == "__main__":
    main()
