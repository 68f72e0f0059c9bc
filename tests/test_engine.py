"""The reshaped engine: tasks, named losses, streams, the checkpointer, run directories, resume rules,
the public API. Each test guards one behaviour and was checked against a mutant of the code it guards."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import samft
from samft.config import config_from_dict
from samft.engine.artifacts.state import load_resume_state as load_state
from samft.engine.artifacts.adapter import read_adapter
from samft.engine.train.checkpointer import Checkpointer, better
from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.train.setup import build_training
from samft.engine.train.loop import TrainingInterrupted, train, train_step
from samft.errors import SamftError
from samft.tasks.losses import balanced_bce, structure_loss
from samft.tasks.terms import DataStream, LossTerm, active_aux_sink

from conftest import interrupt_after, tiny_config


def _cfg(tmp_path, data_dir, name, method="conv_lora", **train_opts):
    opts = {"epochs": 2, "batch_size": 4, "accum_steps": 2, "lr": 1e-3, "log_every": 1, "save_every": 0,
            "progress": False, "device": "cpu", "seed": 5, **train_opts}
    return tiny_config(method, data={"root": str(data_dir), "train": ".", "val_fraction": 0.25},
                       train=opts, output={"dir": str(tmp_path / name)})


# ------------------------------------------------------------------------------------------ losses


def test_balanced_bce_pools_counts_over_the_batch():
    """MyWcploss (DSC): one pos_weight = #neg/#pos and one mean over the batch, times #pos/#all.

    Batch of two 1x2 images, logits 0 (every BCE term = ln 2), targets [1, 0] and [0, 0]: #pos 1, #neg 3,
    so (3 ln2 + 3 ln2) / 4 * 1/4 = 0.375 ln 2. (Per image it would be 0.25 ln 2; without the negative term
    0.1875 ln 2.)
    """
    logits = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    valid = torch.ones_like(target)
    assert float(balanced_bce(logits, target, valid)) == pytest.approx(0.375 * math.log(2), rel=1e-6)
    assert float(structure_loss(logits, target, valid, "balanced", iou=False)) == pytest.approx(0.375 * math.log(2),
                                                                                                  rel=1e-6)


# ------------------------------------------------------------------------------------------ checkpoint choice


def test_better_prefers_higher_lower_and_later_ties():
    assert better(0.5, 0.4, "Sm") and not better(0.3, 0.4, "Sm")
    assert better(0.1, 0.2, "MAE") and not better(0.3, 0.2, "MAE")
    assert better(0.4, 0.4, "Sm") and better(0.2, 0.2, "MAE")  # a tie goes to the later epoch
    assert better(0.4, None, "Sm") and better(0.4, float("nan"), "Sm") and not better(float("nan"), 0.4, "Sm")


def test_the_best_adapter_is_the_best_validated_epoch(tmp_path, synthetic_dir):
    run = train(_cfg(tmp_path, synthetic_dir, "best", epochs=3), show_progress=False)
    epochs = [(float(r["val_Sm"]), int(r["epoch"])) for r in read_metrics(run / "metrics.csv") if r["kind"] == "epoch"]
    assert len({v for v, _ in epochs}) > 1, "the epochs must differ for this test to mean anything"
    _, meta = read_adapter(run / "adapter.safetensors")
    assert int(meta["epoch"]) == max(epochs)[1]
    assert float(meta["best_value"]) == pytest.approx(max(epochs)[0], rel=1e-5)


# ------------------------------------------------------------------------------------------ training behaviour


def test_it_learns(tmp_path, synthetic_dir):
    """A short run on synthetic ellipses improves the selection metric (Sm) and MAE and lowers the loss."""
    run = train(_cfg(tmp_path, synthetic_dir, "learns", method="decoder_only", epochs=4, lr=3e-3), show_progress=False)
    rows = read_metrics(run / "metrics.csv")
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert float(epochs[-1]["val_Sm"]) > float(epochs[0]["val_Sm"])
    assert float(epochs[-1]["val_MAE"]) < float(epochs[0]["val_MAE"])
    assert float(epochs[-1]["loss"]) < float(epochs[0]["loss"])


def _batches(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g), "mask": torch.rand(n, size, size, generator=g) > 0.5,
            "valid_hw": torch.tensor([[size, size]] * n)}


def test_gradient_accumulation_equals_one_big_batch():
    """Batch 4 in one micro-batch = two micro-batches of 2 (the loss is a mean over images)."""
    results = []
    for micro in (1, 2):
        cfg = tiny_config("lora", train={"batch_size": 4 // micro, "accum_steps": micro, "grad_clip": 0.0})
        torch.manual_seed(0)
        parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=10)
        full = _batches(4)
        chunks = [{"labelled": {k: v[i * 4 // micro:(i + 1) * 4 // micro] for k, v in full.items()}}
                  for i in range(micro)]
        stats = train_step(parts, chunks)
        results.append((stats, {n: p.detach().clone() for n, p in parts.model.named_parameters() if p.requires_grad}))
    (s1, w1), (s2, w2) = results
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5) and s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["conv_lora", "lora"])
def test_fused_adamw_steps_like_the_plain_loop(method, monkeypatch):
    """The optimizer is AdamW's fused kernel on a CPU; three training steps (clipping, weight decay on and off by
    group) leave the same weights as PyTorch's per-parameter loop within 1e-6, and the plain loop's state
    (a run saved before) loads into the fused optimizer and steps on the same."""
    import samft.engine.train.setup as setup

    def run(fused: bool):
        if not fused:
            monkeypatch.setattr(setup, "_fused_adam", lambda params: False)
        else:
            monkeypatch.undo()
        cfg = tiny_config(method, train={"batch_size": 2, "weight_decay": 0.05, "lr": 1e-3})
        torch.manual_seed(0)
        parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=10)
        assert bool(parts.optimizer.defaults["fused"]) is fused
        for i in range(3):
            torch.manual_seed(100 + i)  # the same gate noise in both runs
            train_step(parts, [{"labelled": _batches(2)}])
        return parts

    plain, fused = run(False), run(True)
    weights = {n: p.detach().clone() for n, p in fused.model.named_parameters() if p.requires_grad}
    for name, p in plain.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(weights[name], p.detach(), rtol=0, atol=1e-6, msg=name)
    fused.optimizer.load_state_dict(plain.optimizer.state_dict())  # a state saved by the plain loop resumes
    assert fused.optimizer.state_dict()["state"].keys() == plain.optimizer.state_dict()["state"].keys()


def test_named_aux_losses_are_weighted_and_logged(tmp_path, synthetic_dir):
    cfg = _cfg(tmp_path, synthetic_dir, "aux", epochs=1)
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=4)
    assert parts.weights == {"balance": 1.0}  # binary default (the paper's)
    cfg.loss.aux.balance = 0.25
    assert build_training(cfg, torch.device("cpu"), "fp32", 4).weights == {"balance": 0.25}
    lora = build_training(_cfg(tmp_path, synthetic_dir, "x", method="lora"), torch.device("cpu"), "fp32", 4)
    assert lora.weights == {}
    run = train(_cfg(tmp_path, synthetic_dir, "aux", epochs=1), show_progress=False)
    rows = [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "step"]
    assert all(float(r["aux_balance"]) > 0 for r in rows)


def test_old_balance_weight_key_still_loads():
    assert config_from_dict({"loss": {"balance_weight": 2.0}}).loss.aux.balance == 2.0
    assert config_from_dict({}, ["loss.balance_weight=0.5"]).loss.aux.balance == 0.5


class _Unlabelled(torch.utils.data.Dataset):
    """A toy second stream: random images, reproducible per index."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return {"image": torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(100 + i))}


def _feature_loss(model, out, batch):
    return {"feat": model.encode(batch["image"]).square().mean()}


def _stream():
    return {"streams": [DataStream("unlabelled", _Unlabelled(), 3)],
            "terms": [LossTerm("feat", _feature_loss, {"feat": 0.1}, stream="unlabelled")]}


def test_an_extra_stream_trains_logs_and_resumes_exactly(tmp_path, synthetic_dir, monkeypatch):
    straight = train(_cfg(tmp_path, synthetic_dir, "s"), show_progress=False, **_stream())
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, synthetic_dir, "r"), show_progress=False, **_stream())
    # 2 steps x 2 micro-batches of the 7-image stream in batches of 3: 3 + 3 + 1, then 3 of its next epoch
    # (the batches drawn for the interrupted third step are not counted: they are drawn again on resume)
    assert load_state(tmp_path / "r" / "state.safetensors")["progress"]["streams"]["unlabelled"] == {"epoch": 1,
                                                                                            "consumed": 3}
    monkeypatch.undo()
    train(_cfg(tmp_path, synthetic_dir, "r"), resume=True, show_progress=False, **_stream())
    a, b = read_adapter(straight / "adapter_last.safetensors")[0], read_adapter(tmp_path / "r" / "adapter_last.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    untimed = lambda run: [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")}  # noqa: E731
                           for r in read_metrics(run / "metrics.csv")]
    assert untimed(straight) == untimed(tmp_path / "r")
    assert all(float(r["aux_feat"]) > 0 for r in read_metrics(straight / "metrics.csv") if r["kind"] == "step")


class _Killed(BaseException):
    """A SIGKILL stand-in: nothing runs after it (not even the interrupt handler's save)."""


def test_a_kill_during_the_epoch_end_save_logs_each_row_once(tmp_path, synthetic_dir, monkeypatch):
    """save_every falls on the epoch end: the step save happens, the epoch-end save is killed."""
    straight = train(_cfg(tmp_path, synthetic_dir, "s", save_every=3), show_progress=False)
    real, calls = Checkpointer.save, {"n": 0}

    def save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # step 3's save went through; the epoch-end save of step 3 is killed
            raise _Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(_Killed):
        train(_cfg(tmp_path, synthetic_dir, "k", save_every=3), show_progress=False)
    monkeypatch.undo()
    train(_cfg(tmp_path, synthetic_dir, "k", save_every=3), resume=True, show_progress=False)
    rows = lambda run: [(r["kind"], r["epoch"], r["step"], r["loss"]) for r in read_metrics(run / "metrics.csv")]  # noqa: E731
    assert rows(tmp_path / "k") == rows(straight)


# ------------------------------------------------------------------------------------------ run directories


def test_a_folder_of_the_users_is_never_written(tmp_path, synthetic_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("config.yaml", "metrics.csv", "eval.json"):
        (folder / name).write_text("the user's own file")
    for overwrite in (False, True):
        cfg = _cfg(tmp_path, synthetic_dir, "mine")
        cfg.output.overwrite = overwrite
        with pytest.raises(SamftError, match="holds files samft did not create"):
            train(cfg, show_progress=False)
    assert all((folder / n).read_text() == "the user's own file" for n in ("config.yaml", "metrics.csv", "eval.json"))


def test_a_failed_start_leaves_no_folder(tmp_path, synthetic_dir):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    cfg = _cfg(tmp_path, synthetic_dir, "failed")
    cfg.model.checkpoint = str(bad)
    with pytest.raises(SamftError, match="bad.pth"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "failed").exists()


def test_run_lock_refuses_a_second_training_and_a_symlink(tmp_path, synthetic_dir):
    import fcntl

    run = tmp_path / "locked"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SamftError, match="another samft process is training"):
            train(_cfg(tmp_path, synthetic_dir, "locked"), show_progress=False)
    (run / ".lock").unlink()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.symlink(victim, run / ".lock")
    with pytest.raises(SamftError, match="cannot create the run lock"):
        train(_cfg(tmp_path, synthetic_dir, "locked"), show_progress=False)
    assert victim.read_text() == "keep me"


def test_stale_temporary_files_are_removed_on_a_fresh_start(tmp_path, synthetic_dir):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / ".state.safetensors.123.tmp").write_bytes(b"half a write")
    train(_cfg(tmp_path, synthetic_dir, "fresh", epochs=1), show_progress=False)
    assert not list(run.glob(".*.tmp"))


def test_resume_without_a_saved_state_starts_again(tmp_path, synthetic_dir):
    """Killed inside the first save: an adapter_last but no state (the best adapter is written after the state).
    --resume restarts the run in place."""
    first = train(_cfg(tmp_path, synthetic_dir, "nostate", epochs=1), show_progress=False)
    (first / "state.safetensors").unlink()
    (first / "adapter.safetensors").unlink()
    train(_cfg(tmp_path, synthetic_dir, "nostate", epochs=1), resume=True, show_progress=False)
    assert load_state(first / "state.safetensors")["progress"]["step"] > 0


# ------------------------------------------------------------------------------------------ resume rules


def test_resume_applies_allowed_keys_and_refuses_the_rest(tmp_path, synthetic_dir):
    run = train(_cfg(tmp_path, synthetic_dir, "more", epochs=1), show_progress=False)
    from samft.engine.artifacts.rundir import read_run_config

    with pytest.raises(SamftError, match="train.lr: cannot change on --resume"):
        train(read_run_config(run, ["train.lr=0.5"]), resume=True, show_progress=False)
    cfg = read_run_config(run, ["train.epochs=2"])
    cfg.output.dir = str(run)
    train(cfg, resume=True, show_progress=False)
    epochs = [r["epoch"] for r in read_metrics(run / "metrics.csv") if r["kind"] == "epoch"]
    assert epochs == ["1", "2"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert '"train.epochs": {"from": 1, "to": 2}' in (run / "resumes.jsonl").read_text()


def test_data_check_off_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  check: off\n")
    from samft.config import load_config

    assert load_config(path).data.check == "off"
    assert load_config(path, ["data.check=off"]).data.check == "off"
    assert load_config(path, ["data.check=quick"]).data.check == "quick"


# ------------------------------------------------------------------------------------------ evaluation protocol


def test_scores_at_input_size_stretch_prediction_and_ground_truth(synthetic_dir):
    """eval.resize_gt_to_input: both at img_size x img_size; the ground truth resized nearest as PIL (AutoGluon)."""
    import cv2

    from samft.data.layouts import train_val_pairs
    from samft.engine.infer.evaluate import iter_predictions
    from samft.model import build_model
    from samft.tasks.task import make_task

    cfg = tiny_config("lora", data={"root": str(synthetic_dir), "train": "."})
    pairs = train_val_pairs(cfg.data)[0][:2]
    model = build_model(cfg).model
    for pair, scores, gt in iter_predictions(model, pairs, 2, torch.device("cpu"), make_task(cfg),
                                             at_input_size=True):
        assert scores.shape == gt.shape == (64, 64)
        original = np.array(Image.open(pair.mask).convert("L")) > 127
        expected = cv2.resize(original.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST_EXACT)
        assert np.array_equal(gt.astype(bool), expected.astype(bool))


# ------------------------------------------------------------------------------------------ public API


def test_public_api_trains_evaluates_and_segments(tmp_path, synthetic_dir):
    cfg = _cfg(tmp_path, synthetic_dir, "api", epochs=1)
    run = samft.train(cfg)
    results = samft.evaluate(run)
    assert set(results["sets"]) and all("Sm" in s["metrics"] for s in results["sets"].values())
    seg = samft.Segmenter.from_run(run, device="cpu")
    path = sorted((synthetic_dir / "images").iterdir())[0]
    image = np.array(Image.open(path).convert("RGB"))
    by_path, by_array, by_pil = seg.predict(path), seg.predict(image), seg.predict(Image.open(path))
    assert by_path.shape == image.shape[:2] and by_path.dtype == bool
    assert np.array_equal(by_path, by_array) and np.array_equal(by_path, by_pil)
    batch = seg.predict_batch([image, image[:40, :50]], batch_size=2)
    assert np.array_equal(batch[0], by_path) and batch[1].shape == (40, 50)
    from samft.engine.infer.predict import predict_run

    written = predict_run(run, [str(path)], tmp_path / "preds", device="cpu", show_progress=False)
    assert np.array_equal(np.array(Image.open(written[0])) > 0, by_path)
    with pytest.raises(SamftError, match="dtype uint8"):
        seg.predict(image.astype(np.float32))


# ------------------------------------------------------------------------------------------ encoder stages


class _Doubling(torch.nn.Module):
    """A stand-in block: the wrapped block's output doubled, and an auxiliary loss named ``flops``."""

    aux_name = "flops"

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        sink = active_aux_sink()
        if sink is not None:
            sink.add(self.aux_name, x.new_tensor(3.0))
        return 2 * self.block(x)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_block_can_be_replaced_by_any_module_with_the_contract(checkpointing):
    from samft.model import build_model
    from samft.model.encoder import embed, neck

    model = build_model(tiny_config("conv_lora")).model
    enc = model.image_encoder
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    staged = embed(enc, x)
    for blk in enc.blocks:
        staged = blk(staged)
    torch.testing.assert_close(neck(enc, staged), enc(x))  # the stages are SAM's forward
    old = enc.blocks[0]
    enc.blocks[0] = _Doubling(old)
    assert model.aux_loss_names == ["balance", "flops"]
    model.train()
    model.grad_checkpointing = checkpointing
    torch.manual_seed(0)
    out = model(x)
    assert float(out.aux_losses["flops"]) == 3.0 and float(out.aux_losses["balance"].detach()) > 0
    model.grad_checkpointing = False
    torch.manual_seed(0)
    expected = neck(enc, enc.blocks[1](2 * old(embed(enc, x))))
    torch.manual_seed(0)
    torch.testing.assert_close(model.encode(x), expected)


def test_a_full_disk_is_one_line_and_the_run_stays_resumable(tmp_path, synthetic_dir, monkeypatch):
    import errno

    import samft.engine.train.checkpointer as ckpt_mod

    real, calls = ckpt_mod.save_resume_state, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second state save: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_resume_state", full_disk)
    with pytest.raises(SamftError, match=r"no space left on the device while writing the resumable state; free some "
                                         r"space and continue with: samft train --resume .*full"):
        train(_cfg(tmp_path, synthetic_dir, "full", save_every=1), show_progress=False)
    monkeypatch.undo()
    assert load_state(tmp_path / "full" / "state.safetensors")["progress"]["step"] == 1
    train(_cfg(tmp_path, synthetic_dir, "full", save_every=1), resume=True, show_progress=False)
    assert load_state(tmp_path / "full" / "state.safetensors")["progress"]["step"] == 6


# ------------------------------------------------------------------------------------------ what a user is told


def test_progress_is_plain_lines_when_output_is_not_a_terminal(monkeypatch):
    from samft import progress as progress_mod

    lines = []
    plain = progress_mod.PlainProgress("epoch 1/2", 4, every=0.0, write=lines.append)
    plain.advance(1, "loss 0.5")
    plain.advance(1)
    assert lines[0].startswith("epoch 1/2: 1/4 (25%) |") and lines[0].endswith("| loss 0.5")
    assert lines[1].startswith("epoch 1/2: 2/4 (50%)") and "ETA" in lines[1]
    quiet = progress_mod.PlainProgress("x", 4, every=3600.0, write=lines.append)
    quiet.advance(3)
    assert len(lines) == 2  # nothing before the interval has passed


def test_a_run_that_learnt_nothing_is_said(tmp_path, synthetic_dir):
    """lr 0: the decoder never moves, every validation is the same: warned with what to try."""
    with pytest.warns(UserWarning, match="stayed at .* in all 2 validated epochs: the run learnt nothing"):
        train(_cfg(tmp_path, synthetic_dir, "flat", method="decoder_only", lr=0.0), show_progress=False)


def test_degenerate_predictions_are_named():
    from samft.tasks.metrics import BinaryMetrics, ConfusionMetrics

    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    m = BinaryMetrics()
    m.update(np.zeros((4, 4)), gt, "a")
    m.update(np.full((4, 4), 0.1), gt, "b")
    assert m.degenerate() == "empty"
    m.update(np.where(gt, 0.9, 0.1), gt, "c")
    assert m.degenerate() is None
    full = BinaryMetrics()
    full.update(np.ones((4, 4)), gt, "a")
    assert full.degenerate() == "full"
    c = ConfusionMetrics(("sky", "road"))
    c.update(np.zeros((4, 4), int), gt.astype(int), "a")
    assert c.degenerate() == "one class: sky"


def test_a_tiny_base_saved_at_one_size_loads_at_another(tmp_path):
    from samft.model.sam import build_sam

    small = tiny_config("lora").model
    torch.save(build_sam(small).state_dict(), tmp_path / "tiny64.pth")
    big = tiny_config("lora", model={"img_size": 128, "checkpoint": str(tmp_path / "tiny64.pth")}).model
    sam = build_sam(big)
    assert sam.image_encoder.pos_embed.shape[1:3] == (8, 8)
    with torch.no_grad():
        assert torch.isfinite(sam.image_encoder(torch.randn(1, 3, 128, 128))).all()
    other = tiny_config("lora", model={"tiny": {"embed_dim": 48, "num_heads": 2}, "checkpoint": str(tmp_path / "tiny64.pth")}).model
    with pytest.raises(SamftError, match=r"tensor image_encoder\.\S+ has shape \(.*\), the tiny SAM of this config "
                                         r"expects \(.*\)"):
        build_sam(other)


def test_an_unknown_key_is_blamed_where_it_was_written(tmp_path):
    from samft.config import load_config
    from samft.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"^command line \(key=value\): unknown config key 'train.lrr'"):
        load_config(path, ["train.lrr=3"])
    path.write_text("train:\n  lrr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'train.lrr'"):
        load_config(path, ["train.epochs=3"])


def test_fewer_mask_tokens_than_classes_is_warned():
    from samft.tasks.task import make_task

    with pytest.warns(UserWarning, match="model.num_mask_tokens is 2 for 3 classes"):
        make_task(tiny_config("lora", model={"num_mask_tokens": 2}, data={"classes": ["a", "b", "c"]}))


def test_data_without_a_background_class():
    """CamVid-like: class 0 is sky. Distinct display colours for every class, every class tinted."""
    from samft.config import DataConfig
    from samft.data.classes import ClassSpec
    from samft.data.draw import class_overlay

    spec = ClassSpec.of(DataConfig(classes=["sky", "road", "car"], background=None))
    assert len({tuple(c) for c in spec.colours}) == 3 and (spec.colours.sum(axis=1) > 0).all()
    image = np.full((4, 4, 3), 128, np.uint8)
    labels = np.zeros((4, 4), int)
    out = np.asarray(class_overlay(image, labels, spec))[:4, :4]
    assert not np.array_equal(out, image)  # sky (class 0) is tinted like any class
    with_bg = ClassSpec.of(DataConfig(classes=["background", "road", "car"]))
    assert tuple(with_bg.colours[0]) == (0, 0, 0)
    assert np.array_equal(np.asarray(class_overlay(image, labels, with_bg))[:4, :4], image)
    voc = ClassSpec.of(DataConfig(classes=["background", "aeroplane"]))
    assert np.array_equal(voc.colours, voc.palette)  # VOC's classes keep VOC's colours
    with pytest.raises(SamftError, match="data.background: 3 is not a class id"):
        config_from_dict({"data": {"classes": ["a", "b", "c"], "background": 3}})


def test_data_check_reports_each_class_share_by_name(tmp_path):
    from samft.data.check import check_data

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        ids = np.zeros((4, 4), np.uint8)
        ids[:, :1] = 1
        ids[:, 1:2] = 2
        Image.fromarray(ids).save(tmp_path / "masks" / f"{i}.png")
    cfg = tiny_config("lora", data={"root": str(tmp_path), "train": ".", "val_fraction": 0.25,
                                     "classes": ["sky", "road", "car"], "background": None})
    full = check_data(cfg, show_progress=False)
    assert full.notes == ["the train split's 4 pairs: 3 train / 1 val, held out at random (data.val_fraction 0.25, "
                          "data.split_seed 0)"]
    report = full.splits[0]
    assert report.values_text() == "sky: 50.0%, road: 25.0%, car: 25.0%"
    assert report.as_dict()["foreground_mean"] is None


def test_a_runs_split_can_be_reused(tmp_path, synthetic_dir):
    from samft.data.layouts import train_val_pairs
    import json

    from samft.engine.artifacts import split_file

    run = train(_cfg(tmp_path, synthetic_dir, "split", epochs=1, max_steps=1), show_progress=False)
    cfg = _cfg(tmp_path, synthetic_dir, "again")
    first = train_val_pairs(cfg.data)
    cfg.data.split_file = str(run / "split.json")
    cfg.data.val_fraction = 0.5  # ignored: the file decides
    again = train_val_pairs(cfg.data)
    assert [[p.image for p in s] for s in again] == [[p.image for p in s] for s in first]
    (tmp_path / "bad.json").write_text('{"train": []}')
    cfg.data.split_file = str(tmp_path / "bad.json")
    with pytest.raises(SamftError, match="is not a split.json"):
        train_val_pairs(cfg.data)
    listed = json.loads((run / "split.json").read_text())
    for name in ("train", "val"):  # a list emptied: "done" on 0 images before
        (tmp_path / "empty.json").write_text(json.dumps({**listed, name: []}))
        cfg.data.split_file = str(tmp_path / "empty.json")
        with pytest.raises(SamftError, match=rf"empty.json: the '{name}' list is empty"):
            train_val_pairs(cfg.data)
        with pytest.raises(SamftError, match=rf"empty.json: the '{name}' list is empty"):
            split_file.read(tmp_path / "empty.json")  # the run file kind's reader is the same one
    (tmp_path / "null.json").write_text(json.dumps({**listed, "val": [[listed["val"][0][0], None]]}))
    cfg.data.split_file = str(tmp_path / "null.json")  # passed data check, crashed at the first validation before
    with pytest.raises(SamftError, match=r"null.json: field 'val.0' is .*, expected \[image path, mask path\]"):
        train_val_pairs(cfg.data)


def test_repeated_problems_are_grouped_with_a_hint():
    from samft.data.check import group_problems

    problems = [f"/d/masks/{i}.png: class id(s) [11] outside the 11 classes of data.classes (ids 0..10, 255 = ignore)"
                for i in range(700)] + ["/d/images/x.png: cannot read (truncated)", "split val is empty"]
    lines = group_problems(problems)
    assert len(lines) == 3
    assert lines[0].startswith("700 files: class id(s) [11] outside") and "e.g. /d/masks/0.png, /d/masks/1.png" in lines[0]
    assert lines[0].endswith("if 11 is the void/unlabelled id, set data.ignore_index: 11")
    assert lines[1:] == ["/d/images/x.png: cannot read (truncated)", "split val is empty"]


def test_predict_and_eval_take_an_exported_model(tmp_path, synthetic_dir):
    """An export (merged or not) runs through predict, eval and the Segmenter like the run it came from."""
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.artifacts.export import export_run
    from samft.engine.infer.predict import predict_run

    for method in ("lora", "conv_lora"):  # mergeable, not mergeable
        run = train(_cfg(tmp_path, synthetic_dir, f"exp-{method}", method=method, epochs=1), show_progress=False)
        model_file = tmp_path / f"{method}.pth"
        export_run(run, model_file)
        image = sorted((synthetic_dir / "images").iterdir())[0]
        from_run = predict_run(run, [str(image)], tmp_path / f"a-{method}", device="cpu", show_progress=False)
        from_export = predict_run(model_file, [str(image)], None, device="cpu", show_progress=False)
        assert from_export[0].parent == tmp_path / f"{method}-predictions"
        a, b = np.array(Image.open(from_run[0])), np.array(Image.open(from_export[0]))
        assert (a != b).mean() < 1e-3  # merged weights: float rounding may flip a boundary pixel
        results = evaluate_run(model_file, device="cpu", show_progress=False)
        assert (tmp_path / f"{method}.eval.json").is_file() and results["checkpoint"] == str(model_file)
        assert np.array_equal(samft.Segmenter.from_run(model_file, device="cpu").predict(image), b > 0)


@pytest.mark.parametrize("argv", [["samft", "train"], ["samft", "info"]])
@pytest.mark.parametrize("used,expected", [(0.1, {"GOMP_SPINCOUNT": "10000"}), (64.0, {"OMP_WAIT_POLICY": "PASSIVE"})])
def test_openmp_threads_wait_quietly_on_a_busy_machine(monkeypatch, argv, used, expected):
    """Long commands measure the cores in use now (cores_in_use), the others read the 1-minute load."""
    import sys

    from samft import cli

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    if argv[1] == "train":
        monkeypatch.setattr(cli, "cores_in_use", lambda: (used, "now"))
        monkeypatch.setattr(cli.os, "getloadavg", lambda: (64.0 - used, 0, 0))  # not read
    else:
        monkeypatch.setattr(cli, "cores_in_use", lambda: (64.0 - used, "now"))  # not called
        monkeypatch.setattr(cli.os, "getloadavg", lambda: (used, used, used))
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "torch")  # as at the CLI's start, before torch loads
    cli.quiet_openmp()
    assert {k: cli.os.environ.get(k) for k in expected} == expected
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stays
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cli.quiet_openmp()
    assert cli.os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in cli.os.environ


def test_cores_in_use_reads_what_runs_now_not_the_lagging_load(monkeypatch):
    """/proc/stat sampled twice: 150 of 200 ticks idle on 2 cores -> 0.5 cores in use, whatever the 1-minute
    load says; the load average only when /proc/stat cannot be read."""
    from samft import cli

    samples = iter([(1000, 800), (1200, 950)])
    monkeypatch.setattr(cli, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.9, 1.9, 1.9))
    assert cli.cores_in_use(window=0) == (pytest.approx(0.5), "now")

    def unreadable():
        raise OSError("no /proc")

    monkeypatch.setattr(cli, "_cpu_times", unreadable)
    assert cli.cores_in_use(window=0) == (1.9, "1-minute load")


def test_cpu_times_parse_proc_stat_on_linux():
    from samft import cli

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat (not Linux)")
    total, idle = cli._cpu_times()
    assert 0 <= idle <= total and total > 0


def test_device_errors_name_the_option_the_value_came_from():
    """``eval/predict --device`` errors name ``--device``; training's name ``train.device``."""
    from samft.engine.runtime import pick_device
    from samft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--device: 'gpu9' is not a device"):
        pick_device("gpu9")
    with pytest.raises(ConfigError, match=r"^train\.device: 'gpu9' is not a device"):
        pick_device("gpu9", "train.device")


def test_resume_of_a_finished_run_without_its_state_is_refused_and_loses_nothing(tmp_path, synthetic_dir):
    """The trust review's first data loss: a finished run whose state.safetensors was deleted (to save space) was
    wiped and retrained by --resume. Now one line, every file untouched; output.overwrite=true restarts it."""
    run = train(_cfg(tmp_path, synthetic_dir, "done", epochs=1), show_progress=False)
    (run / "state.safetensors").unlink()
    (run / "eval.json").write_text('{"sets": {}}')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(SamftError, match=r"has trained weights but no state\.safetensors.*samft train --config"):
        train(_cfg(tmp_path, synthetic_dir, "done", epochs=1), resume=True, show_progress=False)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before
    cfg = _cfg(tmp_path, synthetic_dir, "done", epochs=1)
    cfg.output.overwrite = True  # asked for explicitly: trained again from step 0
    train(cfg, resume=True, show_progress=False)
    assert (run / "state.safetensors").is_file() and not (run / "eval.json").exists()


def test_a_users_tmp_files_are_never_cleaned(tmp_path, synthetic_dir):
    """Training into a user's folder used to delete the user's *.tmp files before refusing the folder; and in a
    run folder only samft's own temporary names are cleaned."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("notes.tmp", ".draft.tmp", ".eval.json.77.tmp"):
        (mine / name).write_text("the user's")
    with pytest.raises(SamftError, match="holds files samft did not create"):
        train(_cfg(tmp_path, synthetic_dir, "mine", epochs=1), show_progress=False)
    assert sorted(p.name for p in mine.iterdir()) == [".draft.tmp", ".eval.json.77.tmp", "notes.tmp"]
    run = train(_cfg(tmp_path, synthetic_dir, "run", epochs=1), show_progress=False)
    (run / ".draft.tmp").write_text("the user's")
    (run / ".metrics.csv.samft-4242.tmp").write_text("half a write")
    cfg = _cfg(tmp_path, synthetic_dir, "run", epochs=1)
    cfg.output.overwrite = True
    train(cfg, show_progress=False)
    assert (run / ".draft.tmp").read_text() == "the user's"
    assert not (run / ".metrics.csv.samft-4242.tmp").exists()


def test_a_refused_resume_changes_nothing(tmp_path, synthetic_dir):
    """A resume refused at the saved state (here: a damaged state file) has not rewritten config.yaml or
    resumes.jsonl."""
    from samft.engine.artifacts.rundir import read_run_config

    run = train(_cfg(tmp_path, synthetic_dir, "refused", epochs=1), show_progress=False)
    state = run / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    cfg = read_run_config(run, ["train.epochs=2"])
    cfg.output.dir = str(run)
    with pytest.raises(SamftError):
        train(cfg, resume=True, show_progress=False)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before


@pytest.mark.parametrize("argv,said", [(["samft", "train", "--config", "c.yaml"], True),
                                       (["samft", "predict", "--help"], False), (["samft", "info"], False)])
def test_the_busy_machine_note_only_for_long_commands(monkeypatch, capsys, argv, said):
    import sys

    from samft import cli

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(cli, "cores_in_use", lambda: (64.0, "now"))
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(sys, "argv", argv)
    cli.quiet_openmp()
    assert ("machine is busy" in capsys.readouterr().err) is said
