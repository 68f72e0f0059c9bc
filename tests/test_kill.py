"""A real training process killed (SIGKILL) or interrupted (Ctrl-C), then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from samft.data.synthetic import write_dataset
from samft.engine.artifacts.state import load_resume_state

from conftest import ROOT, TINY
from test_cli_e2e import samft


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT), "SAMFT_CACHE": str(cwd / ".cache")}
    return subprocess.Popen([sys.executable, "-m", "samft", "train", *args, "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until metrics.csv has a row for ``step`` (or later); return the last logged step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        metrics = run / "metrics.csv"
        if metrics.exists():
            steps = [int(line.split(",")[2]) for line in metrics.read_text().splitlines()[1:]
                     if line.startswith("step,") and line.count(",") > 3]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise AssertionError("training did not reach the step in time")


def _workdir(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "data", n=40, seed=2)
    config = {"model": TINY, "data": {"root": "data", "train": ".", "val_fraction": 0.2, "num_workers": 0},
              "train": {"epochs": 200, "batch_size": 2, "log_every": 1, "save_every": 1, "device": "cpu"},
              "output": {"dir": "runs/k"}}
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _logged_steps(run: Path) -> list[int]:
    lines = (run / "metrics.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[2]) for line in lines if line.startswith("step,")]


def test_sigkill_then_resume(tmp_path):
    cwd = _workdir(tmp_path)
    run = cwd / "runs" / "k"
    proc = _start(cwd, "--config", "k.yaml")
    _wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = load_resume_state(run / "state.safetensors")  # never half-written: it loads
    saved = state["progress"]["step"]
    assert saved >= 4
    samft("train", "--resume", "runs/k", f"train.max_steps={saved + 3}", "--no-progress", cwd=cwd)
    assert not list(run.glob(".*.tmp")), "a write cut short by the kill is cleaned up"
    steps = _logged_steps(run)
    assert steps == list(range(1, saved + 4)), "every step exactly once, none lost or repeated"
    final = load_resume_state(run / "state.safetensors")
    assert final["progress"]["step"] == saved + 3
    assert all(torch.isfinite(t).all() for t in final["trainable"].values())
    assert (run / "adapter.safetensors").is_file()


def test_ctrl_c_saves_the_last_step_and_resumes(tmp_path):
    cwd = _workdir(tmp_path)
    run = cwd / "runs" / "k"
    proc = _start(cwd, "--config", "k.yaml", "train.save_every=0")  # only the interrupt saves mid-epoch
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    err = " ".join(err.split())
    assert "interrupted at step" in err and "samft train --resume runs/k" in err and "Traceback" not in err
    saved = load_resume_state(run / "state.safetensors")["progress"]["step"]
    assert saved >= 3
    samft("train", "--resume", "runs/k", f"train.max_steps={saved + 2}", "--no-progress", cwd=cwd)
    assert _logged_steps(run) == list(range(1, saved + 3))
