"""Two processes on CPU (gloo) under torchrun, through the real command line: one run directory,
validation/evaluation over the whole set (each image once), identical weights on both ranks, and a
failure on one rank ending both with the error shown; a tiny SAM 2.1 training holds the same invariants."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from samft.engine.artifacts.adapter import read_adapter
from samft.engine.distributed import tensors_sha256
from samft.engine.infer.evaluate import evaluate_run

from conftest import ROOT, RUN_FILES, TINY


def torchrun(*args: str, cwd: Path, script: tuple[str, ...] = ("-m", "samft")) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMFT_CACHE": str(cwd / ".cache"), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE",
           "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *script, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from samft.data.synthetic import write_dataset

    cwd = tmp_path_factory.mktemp("ddp")
    write_dataset(cwd / "data", n=20, seed=2)
    config = {
        "model": TINY,
        "peft": {"method": "conv_lora"},  # top-1 experts: some parameters unused on a step (find_unused_parameters)
        "data": {"root": "data", "train": ".", "val_fraction": 0.25, "num_workers": 0},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 0,
                  "device": "cpu", "grad_checkpointing": True},
        "eval": {"batch_size": 2},
        "output": {"dir": "runs/ddp"},
    }
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(config))
    return cwd


# TensorBoard as well where it is installed (its test says whether only the main process logged)
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
LOGGERS = "train.loggers=[csv,tensorboard]" if TENSORBOARD else "train.loggers=[csv]"


@pytest.fixture(scope="module")
def trained(workdir) -> tuple[Path, str]:
    out = _ok(torchrun("train", "--config", "tiny.yaml", "--no-progress", LOGGERS, cwd=workdir))
    return workdir / "runs" / "ddp", out


@pytest.fixture(scope="module")
def trained_sam2(workdir) -> tuple[Path, str]:
    """The same training on a tiny SAM 2.1 (Hiera) instead of the tiny SAM: one override, its own folder."""
    out = _ok(torchrun("train", "--config", "tiny.yaml", "--no-progress", LOGGERS, "model.family=sam2",
                       "output.dir=runs_sam2/ddp", cwd=workdir))
    return workdir / "runs_sam2" / "ddp", out


def assert_one_run_with_identical_weights(run: Path, out: str, family: str) -> None:
    """One run directory, written and reported by rank 0 alone, holding the weights both ranks ended with."""
    assert [p.name for p in run.parent.iterdir()] == ["ddp"]
    assert {p.name for p in run.iterdir()} == RUN_FILES | ({"tensorboard"} if TENSORBOARD else set())
    assert "cpu x 2 processes" in out
    assert out.count(f"done: {run.parent.name}/ddp") == 1, "only rank 0 reports"
    # each rank hashed its final trainable tensors; training checks they are equal and rank 0 prints the digest
    line = " ".join(out.split())  # the console may wrap long lines
    assert "all 2 processes hold identical trainable weights (sha256 " in line
    digest = line.split("identical trainable weights (sha256 ", 1)[1][:64]
    tensors, meta = read_adapter(run / "adapter_last.safetensors")
    assert tensors_sha256(tensors) == digest, "rank 0's saved adapter is the weights both ranks hold"
    assert meta["step"] == "3" and meta["family"] == family


def assert_validation_covers_the_set_once(run: Path) -> None:
    """Sharded validation (3 + 2 images), merged, equals a single-process evaluation of the same weights."""
    with open(run / "metrics.csv", newline="") as f:
        epoch = [r for r in csv.DictReader(f) if r["kind"] == "epoch"][-1]
    single = evaluate_run(run, device="cpu", show_progress=False, write=False)["sets"]["val"]
    assert single["n_images"] == 5
    for name, value in single["metrics"].items():
        assert float(epoch[f"val_{name}"]) == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_one_run_directory_and_identical_weights_on_both_ranks(trained):
    assert_one_run_with_identical_weights(*trained, family="sam")


def test_sam2_trains_under_torchrun(trained_sam2):
    """SAM 2.1 (tiny Hiera, conv_lora with unused experts on a step) under DDP: the SAM 1 run's invariants."""
    run, out = trained_sam2
    assert_one_run_with_identical_weights(run, out, family="sam2")
    assert_validation_covers_the_set_once(run)


def test_only_the_main_process_logs_to_tensorboard(trained):
    """One event stream (one writer: rank 0), holding metrics.csv's scalars once each and the validation
    images once (drawn by rank 0 alone while rank 1 waits). Mutant: every rank opening the trackers."""
    if not TENSORBOARD:
        pytest.skip("tensorboard is not installed (pip install 'samft[tensorboard]')")
    from test_loggers import assert_same, expected, tensorboard_scalars

    run, _ = trained
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    csv_rows = expected(run)
    logged, acc = tensorboard_scalars(run)
    assert_same(logged, csv_rows, "tensorboard")
    validated = [s for s, _ in csv_rows["val_Sm"]]
    tags = [t for t in acc.Tags()["images"] if t.startswith("val_images/")]
    assert tags and all([e.step for e in acc.Images(t)] == validated for t in tags)


def test_validation_covers_the_whole_set_once(trained):
    assert_validation_covers_the_set_once(trained[0])


def test_eval_under_torchrun(trained, workdir):
    run, _ = trained
    # "--" keeps torchrun's own parser from taking --run for its --run-path
    proc = torchrun("eval", "--run-dir", "runs/ddp", "--json", "--device", "cpu", cwd=workdir)
    _ok(proc)
    printed = json.loads(proc.stdout)  # rank 0 alone prints: one JSON document
    written = json.loads((run / "eval.json").read_text())
    assert printed == written
    single = evaluate_run(run, device="cpu", show_progress=False, write=False)["sets"]["val"]
    result = written["sets"]["val"]
    assert result["n_images"] == 5
    for name, value in single["metrics"].items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_predict_under_torchrun_writes_each_image_once(trained, workdir):
    """Each process predicts its share (10 + 10 images); together the same masks as one process."""
    import numpy as np
    from PIL import Image

    from samft.engine.infer.predict import predict_run

    run, _ = trained
    proc = torchrun("predict", "data/images", "--run-dir", "runs/ddp", "--out", "pred", "--device", "cpu",
                    cwd=workdir)
    out = " ".join(_ok(proc).split())
    assert out.count("wrote 20 mask(s)") == 1, "rank 0 reports, for all the images"
    assert "predicted by 2 processes: 10 + 10 images" in out
    single = predict_run(run, [str(workdir / "data" / "images")], workdir / "pred1", device="cpu",
                         show_progress=False)
    assert sorted(p.name for p in (workdir / "pred").iterdir()) == sorted(p.name for p in single)
    for path in single:  # the shards batch other images together: equal up to a rare pixel at the threshold
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(workdir / "pred" / path.name))
        assert a.shape == b.shape and (a == b).mean() > 0.999, path.name


def test_a_failing_rank_ends_all_ranks_with_its_error(workdir):
    proc = torchrun("train", "--config", "tiny.yaml", "--no-progress", "output.dir=runs/failing",
                    cwd=workdir, script=(str(ROOT / "tests" / "ddp_failing_rank.py"),))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error (rank 1): broken.png: not an image (deliberate failure on rank 1)" in " ".join(out.split())
    # torchrun's failure summary shows the message (from the error file samft writes), not only an exit code
    summary = out[out.rindex("FAILED"):]
    assert "rank      : 1" in summary and "traceback : DataError: broken.png: not an image" in summary
    assert "done:" not in out


def test_diverged_ranks_are_an_error(monkeypatch):
    import torch

    import samft.engine.distributed as D
    from samft.errors import SamftError

    tensors = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    mine = tensors_sha256(tensors)
    assert mine == tensors_sha256({"b": tensors["b"].clone(), "a": tensors["a"].clone()})
    assert mine != tensors_sha256({**tensors, "a": torch.tensor([1.0, 1.0, 1.0 + 1e-7])})
    monkeypatch.setattr(D, "gather_objects", lambda obj, info: [obj, obj, "f" * 64])
    with pytest.raises(SamftError, match=r"the 3 processes ended with different weights \(ranks \[0, 1\]: "):
        D.check_in_sync(tensors, D.DistInfo(rank=0, world_size=3))


def test_the_context_tears_down_only_a_group_it_created(tmp_path, monkeypatch):
    """``distributed()`` creates the group under torchrun's variables and destroys it on success; a group
    that already existed (a caller's) is left alone, as is a group after a failure (left to process exit)."""
    import torch.distributed as dist

    import samft.engine.distributed as D

    store = f"file://{tmp_path / 'store'}"
    made, real_init = [], dist.init_process_group

    def init_group(backend, timeout):  # a one-process group standing in for torchrun's two
        made.append(backend)
        real_init(backend, init_method=store, rank=0, world_size=1, timeout=timeout)

    monkeypatch.setattr(D.dist, "init_process_group", init_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with D.distributed("cpu") as info:
        assert D.is_initialized() and info.world_size == 2 and made == ["gloo"]
    assert not D.is_initialized()  # its own group: destroyed

    real_init("gloo", init_method=f"{store}2", rank=0, world_size=1)  # the caller's group
    try:
        with D.distributed("cpu"):
            pass
        assert D.is_initialized() and made == ["gloo"]  # neither made again nor destroyed
    finally:
        dist.destroy_process_group()

    with pytest.raises(RuntimeError, match="boom"):
        with D.distributed("cpu"):
            raise RuntimeError("boom")
    assert D.is_initialized()  # after a failure: left to the process exit
    dist.destroy_process_group()


@pytest.mark.parametrize("peft_section, model_extra", [
    ({"method": "hf", "hf": {"type": "loha"}}, {}),  # HF peft's layers under DDP
    ({"method": "lora", "lora": {"variant": "dora"}}, {"quantize": "nf4"}),  # QLoRA (DoRA on an NF4 base)
])
def test_hf_peft_and_a_quantised_base_train_under_ddp(tmp_path, peft_section, model_extra):
    pytest.importorskip("peft" if peft_section["method"] == "hf" else "bitsandbytes")
    from samft.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", n=12, seed=2)
    config = {"model": {**TINY, **model_extra}, "peft": peft_section,
              "data": {"root": "data", "train": ".", "val_fraction": 0.25, "num_workers": 0},
              "train": {"epochs": 1, "max_steps": 2, "batch_size": 2, "lr": 1e-3, "save_every": 0, "device": "cpu",
                        "grad_checkpointing": True},
              "output": {"dir": "runs/ddp"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    line = " ".join(_ok(torchrun("train", "--config", "tiny.yaml", "--no-progress", cwd=tmp_path)).split())
    assert "all 2 processes hold identical trainable weights (sha256 " in line
    digest = line.split("identical trainable weights (sha256 ", 1)[1][:64]
    tensors, _ = read_adapter(tmp_path / "runs" / "ddp" / "adapter_last.safetensors")
    assert tensors_sha256(tensors) == digest
