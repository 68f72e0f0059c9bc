#!/usr/bin/env python
"""How CPU thread settings behave on a busy machine: one short training, alone and beside competing ones.

    python scripts/bench_threads.py [--steps 40] [--competitors 0,1,3] [--rounds 2]

Each measured training runs in a fresh process (the OpenMP runtime reads ``OMP_WAIT_POLICY`` when torch
loads) under three settings:

- ``default``: torch's defaults (intra-op threads = all cores, OpenMP's own wait policy): samft before;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (what ``samft`` now sets unless the user set it);
- ``1 thread``: ``train.num_threads=1``.

Competitors are the same training with default settings, restarted in a loop until the measurement ends.
Prints the median wall time per (competitors, setting) and its ratio to ``default`` measured in the same
round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = """
import sys, time, warnings
warnings.filterwarnings("ignore")
from samft.config import config_from_dict
from samft.engine.train.loop import train
cfg = config_from_dict({
    "model": {"type": "tiny", "img_size": 128, "tiny": {"embed_dim": 64, "depth": 2, "num_heads": 2,
              "window_size": 4, "global_attn_indexes": [1], "out_chans": 64}},
    "peft": {"method": "conv_lora"},
    "data": {"root": sys.argv[1], "train": ".", "val_fraction": 0.1, "num_workers": 0, "check": "off"},
    "train": {"epochs": 100, "max_steps": int(sys.argv[3]), "batch_size": 4, "num_threads": int(sys.argv[4]),
              "val_every": 1000, "save_every": 0, "progress": False, "device": "cpu"},
    "output": {"dir": sys.argv[2], "overwrite": True}})
t0 = time.perf_counter()
train(cfg, show_progress=False)
print(time.perf_counter() - t0)
"""
SETTINGS = {"default": ({}, 0), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
            "spin 10k": ({"GOMP_SPINCOUNT": "10000"}, 0), "1 thread": ({}, 1)}


def env_for(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def measure(data: Path, work: Path, steps: int, setting: str) -> float:
    extra, threads = SETTINGS[setting]
    out = subprocess.run([sys.executable, "-c", TRAIN, str(data), str(work / f"m-{setting}"), str(steps),
                          str(threads)], env=env_for(extra), capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def start_competitor(data: Path, work: Path, i: int, steps: int) -> subprocess.Popen:
    loop = f"while true; do {sys.executable} -c '{TRAIN}' {data} {work}/c{i} {steps * 4} 0 >/dev/null 2>&1; done"
    return subprocess.Popen(["bash", "-c", loop], env=env_for({}), start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--competitors", default="0,1,3")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from samft.data.synthetic import write_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    data = write_dataset(work / "data", n=48, seed=0)
    print(f"{os.cpu_count()} cores; tiny Conv-LoRA training, {args.steps} steps, img 128, batch 4; "
          f"median of {args.rounds} rounds; wall seconds (ratio to default in the same load)")
    print("| competing trainings | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for n in [int(c) for c in args.competitors.split(",")]:
        procs = [start_competitor(data, work, i, args.steps) for i in range(n)]
        try:
            time.sleep(3 if n else 0)  # let them start
            times = {s: [] for s in SETTINGS}
            for _ in range(args.rounds):
                for s in SETTINGS:  # interleaved
                    times[s].append(measure(data, work, args.steps, s))
        finally:
            for p in procs:
                os.killpg(p.pid, 15)
        med = {s: statistics.median(v) for s, v in times.items()}
        cells = [f"{med[s]:.1f} s ({med[s] / med['default']:.2f}x)" for s in SETTINGS]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
