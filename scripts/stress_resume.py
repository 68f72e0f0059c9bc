"""Kill trainings with SIGKILL at random moments, resume each, and compare with an uninterrupted run.

    python scripts/stress_resume.py --n 20

One uninterrupted reference training (tiny SAM, synthetic data, one CPU thread), then N trainings of the
same config, each killed with SIGKILL either at a random time or inside an atomic write (the run
directory is polled for ``.*.tmp`` files; ``os.fsync`` is slowed by 50 ms in the trainings, through a
wrapper of this script, so that the window between the temporary file and its rename can be hit), then
resumed with ``samft train --resume`` (a quarter of the resumes are killed again and resumed once more).
Each finished run is compared with the reference tensor for tensor (``adapter_last.safetensors``,
``adapter.safetensors``, every tensor and number of ``state.safetensors``) and row for row
(``metrics.csv`` without its timing columns). Prints one line per training and then
``kills N / resumed N / exact N``.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"type": "tiny", "img_size": 64,
        "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1],
                 "out_chans": 32, "decoder_depth": 2, "decoder_mlp_dim": 64, "decoder_heads": 2}}
TIMING = {"images_per_s", "seconds"}
# the training process: os.fsync slowed down so that a kill can land inside an atomic write
WRAPPER = ("import os, sys, time\n_fsync = os.fsync\n"
           "def fsync(fd):\n    time.sleep(float(os.environ.get('STRESS_FSYNC_DELAY', '0')))\n    _fsync(fd)\n"
           "os.fsync = fsync\nsys.argv = ['samft'] + sys.argv[1:]\nfrom samft.cli import main\nmain()\n")


def config(epochs: int) -> dict:
    return {"model": TINY, "peft": {"method": "conv_lora"},
            "data": {"root": "data", "train": ".", "val_fraction": 0.25, "num_workers": 0, "check": "quick"},
            "train": {"epochs": epochs, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 2,
                      "device": "cpu", "num_threads": 1, "seed": 7, "progress": False}}


def start(cwd: Path, *args: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SAMFT_CACHE": str(cwd / ".cache"),
           "STRESS_FSYNC_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-c", WRAPPER, "train", *args, "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_at_random_time(proc: subprocess.Popen, run: Path, seconds: float, marker: str = "config.yaml") -> str:
    """SIGKILL ``seconds`` after ``run/marker`` appears (the start-up time varies with the machine's load)."""
    while proc.poll() is None and not (run / marker).exists():
        time.sleep(0.01)
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    return _kill(proc, run, f"time {seconds:.2f}s after {marker}")


def kill_inside_a_write(proc: subprocess.Popen, run: Path, nth: int, only: str = "") -> str:
    """SIGKILL while the ``nth`` temporary file seen in the run directory exists (inside an atomic write);
    ``only``: count the writes of files whose name starts with it (``state``, ``adapter_last`` ...)."""
    before: set[str] = set()
    count = 0
    while proc.poll() is None:
        try:
            tmps = {e.name for e in os.scandir(run) if e.name.endswith(".tmp") and e.name.startswith(f".{only}")}
        except FileNotFoundError:
            tmps = set()
        for name in tmps - before:  # a write that started since the last look
            count += 1
            if count >= nth:
                return _kill(proc, run, f"inside write #{nth} ({name.split('.')[1]})")
        before = tmps
        time.sleep(0.003)
    return "finished before the kill"


def _kill(proc: subprocess.Popen, run: Path, what: str) -> str:
    if proc.poll() is not None:
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = last_step(run)
    files = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    return f"killed {what}, last logged step {step}, files {','.join(files) or '-'}"


def last_step(run: Path) -> int | None:
    try:
        rows = [r for r in csv.reader(open(run / "metrics.csv")) if r and r[0] == "step" and len(r) > 3]
        return int(rows[-1][2]) if rows else None
    except (OSError, ValueError):
        return None


def metrics_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def same(a, b, where: str) -> str | None:
    """The first difference between two loaded structures, or None."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        return None if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else f"{where}: tensors differ"
    if isinstance(a, np.ndarray):
        return None if np.array_equal(a, b) else f"{where}: arrays differ"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{where}: keys differ"
        return next((d for k in a if (d := same(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := same(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, float) and a != a and b != b:
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def compare(run: Path, ref: Path) -> str | None:
    from samft.engine.artifacts.state import load_resume_state
    from samft.engine.artifacts.adapter import read_adapter

    for name in ("adapter_last.safetensors", "adapter.safetensors"):
        a, b = (dict(sorted(read_adapter(d / name)[0].items())) for d in (ref, run))  # file order is not kept
        diff = same(a, b, name)
        if diff:
            return diff
    a, b = load_resume_state(ref / "state.safetensors"), load_resume_state(run / "state.safetensors")
    for s in (a, b):  # Python's and numpy's global generators are not used by training, nor seeded by it:
        s.pop("samft_version")  # they differ between any two processes
        s["progress"]["rng"].pop("python"), s["progress"]["rng"].pop("numpy")
    diff = same(a, b, "state")
    if diff:
        return diff
    ra, rb = metrics_rows(ref / "metrics.csv"), metrics_rows(run / "metrics.csv")
    if ra != rb:
        extra = [r for r in rb if r not in ra]
        first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        return (f"metrics.csv: {len(rb)} rows vs {len(ra)}; first difference at row {first + 1}: "
                f"{rb[first] if first < len(rb) else '-'} (extra rows: {extra[:2]})")
    return None


def resume(cwd: Path, name: str) -> tuple[bool, str]:
    proc = start(cwd, "--resume", f"runs/{name}")
    out, err = proc.communicate()
    if proc.returncode == 0:
        return True, "resumed"
    return False, f"resume exit {proc.returncode}: {' '.join(err.split())[-300:]}"


def one(cwd: Path, i: int, rng: random.Random, window: tuple[float, float], ref: Path, at: str = "") -> dict:
    name = f"k{i}"
    cfg = config(EPOCHS)
    cfg["output"] = {"dir": f"runs/{name}"}
    (cwd / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run = cwd / "runs" / name
    inside = i % 2 == 1 or bool(at)
    proc = start(cwd, "--config", f"{name}.yaml", delay=0.05 if inside else 0.0)
    if at:  # a named kill point: FILE:N = inside the N-th write of FILE
        only, nth = at.rsplit(":", 1)
        where = kill_inside_a_write(proc, run, int(nth), only)
    elif inside:
        where = kill_inside_a_write(proc, run, rng.randint(1, 24))
    else:
        where = kill_at_random_time(proc, run, rng.uniform(0, window[1] - window[0]))
    killed = where.startswith("killed")
    if not killed:
        proc.communicate()
        return {"killed": False, "resumed": False, "exact": False, "where": where, "diff": None}
    if not at and rng.random() < 0.25:  # kill the resume too, then resume again
        again = start(cwd, "--resume", f"runs/{name}", delay=0.05)
        where += " | resume " + kill_at_random_time(again, run, rng.uniform(0, (window[1] - window[0]) / 2),
                                                    ".lock")
    ok, how = resume(cwd, name)
    diff = compare(run, ref) if ok else how
    return {"killed": killed, "resumed": ok, "exact": ok and diff is None, "where": where, "diff": diff}


EPOCHS = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="trainings to kill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temporary folder)")
    ap.add_argument("--at", action="append", default=[], metavar="FILE:N",
                    help="also kill inside the N-th write of FILE (e.g. state:1, the first state; state:7, the "
                         "epoch-end state when a save_every save falls on the same step); repeatable")
    args = ap.parse_args()
    cwd = args.workdir or Path(tempfile.mkdtemp(prefix="samft-stress-"))
    cwd.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from samft.data.synthetic import write_dataset

    if not (cwd / "data").is_dir():
        write_dataset(cwd / "data", n=12, seed=3)
    ref_cfg = {**config(EPOCHS), "output": {"dir": "runs/ref"}}
    (cwd / "ref.yaml").write_text(yaml.safe_dump(ref_cfg))
    shutil.rmtree(cwd / "runs" / "ref", ignore_errors=True)
    t0, t_run = time.time(), None
    proc = start(cwd, "--config", "ref.yaml")
    while proc.poll() is None:  # when the run directory appears: kills before it find nothing to resume
        if t_run is None and (cwd / "runs" / "ref" / "config.yaml").exists():
            t_run = time.time() - t0
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"reference training failed: {err}")
    duration = time.time() - t0
    window = (t_run or 0.5, 0.9 * duration)
    print(f"reference: {duration:.1f}s (run directory at {window[0]:.1f}s), {last_step(cwd / 'runs' / 'ref')} steps, "
          f"in {cwd}", flush=True)
    rng = random.Random(args.seed)
    results = []
    i = 0
    while sum(r["killed"] for r in results) < args.n and i < 3 * args.n:  # a training that ends first is redone
        r = one(cwd, i, rng, window, cwd / "runs" / "ref")
        results.append(r)
        i += 1
        if not r["killed"]:
            verdict = "not counted"
        elif r["exact"]:
            verdict = "exact"
        else:
            verdict = ("DIFFERS: " if r["resumed"] else "NOT RESUMED: ") + str(r["diff"])
        print(f"#{i - 1:02d} {r['where']} -> {verdict}", flush=True)
    for k, at in enumerate(args.at):
        r = one(cwd, 1000 + k, rng, window, cwd / "runs" / "ref", at)
        results.append(r)
        verdict = "exact" if r["exact"] else ("DIFFERS: " if r["resumed"] else "NOT RESUMED: ") + str(r["diff"])
        print(f"at {at}: {r['where']} -> {verdict if r['killed'] else 'not counted'}", flush=True)
    killed = [r for r in results if r["killed"]]
    resumed, exact = sum(r["resumed"] for r in killed), sum(r["exact"] for r in killed)
    print(f"kills {len(killed)} / resumed {resumed} / exact {exact}")
    if not args.workdir:
        shutil.rmtree(cwd, ignore_errors=True)


if __name__ == "__main__":
    main()
