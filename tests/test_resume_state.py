"""The resumable state: one safetensors file, no pickle; exact round trip; old state.pt read safely."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import samft.engine.artifacts.state as ckpt
from samft.engine.artifacts.state import load_resume_state, save_resume_state
from samft.engine.artifacts.adapter import load_trainable
from samft.errors import CheckpointError

from conftest import tiny_config


def _training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
                             {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    return model, opt, sched, scaler


def _step(model, opt, sched, scaler, k: int) -> None:
    x = torch.linspace(-1, 1, 12).reshape(3, 4) * (k + 1)
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()


def _state(model, opt, sched, scaler) -> dict:
    random.seed(3)
    np.random.seed(4)
    np.random.normal()  # a cached gaussian in numpy's state
    return {
        "samft_version": "0.1.0",
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": {"epoch": 1, "micro_in_epoch": 3, "step": 7, "best_value": float("nan"), "best_epoch": -1,
                     "epoch_loss_sum": 0.1 + 0.2, "epoch_loss_count": 3, "none": None, "flag": True,
                     "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state(), "cuda": [torch.get_rng_state(), torch.get_rng_state()],
                             "inf": [float("inf"), -float("inf")], "big": 2 ** 70}},
    }


def assert_same(a, b, where="state"):
    """Equal structures: same types (tuple stays tuple, int keys stay int), tensors equal in dtype and value."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_round_trip_gives_back_the_same_structure(tmp_path):
    objs = _training_objects()
    for k in range(3):
        _step(*objs, k)
    state = _state(*objs)
    save_resume_state(tmp_path / "state.safetensors", state)
    back = load_resume_state(tmp_path / "state.safetensors")
    assert_same(state, back)
    assert isinstance(back["progress"]["rng"]["python"], tuple)  # what random.setstate needs
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert list(back["optimizer"]["state"]) == [0, 1, 2, 3]  # int keys, as torch writes them


def test_no_pickle_in_the_file(tmp_path):
    objs = _training_objects()
    _step(*objs, 0)
    save_resume_state(tmp_path / "s.safetensors", _state(*objs))
    data = (tmp_path / "s.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header.pop("__metadata__")
    assert meta["format"] == "samft-state-1" and json.loads(meta["state"])  # plain JSON
    assert st_load(data).keys() == header.keys()  # everything else is tensors
    assert not list(tmp_path.glob(".*.tmp"))


def test_loaded_state_continues_exactly(tmp_path):
    """A fresh AdamW / LambdaLR / GradScaler loaded from the file takes the same next steps as the originals."""
    original = _training_objects(0)
    for k in range(3):
        _step(*original, k)
    model, opt, sched, scaler = original
    save_resume_state(tmp_path / "s.safetensors", {
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters()}, "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
        "progress": {"rng": ckpt.rng_state()}})
    saved = load_resume_state(tmp_path / "s.safetensors")
    fresh = _training_objects(1)  # other initial weights: everything must come from the file
    f_model, f_opt, f_sched, f_scaler = fresh
    with torch.no_grad():
        for n, p in f_model.named_parameters():
            p.copy_(saved["trainable"][n])
    f_opt.load_state_dict(saved["optimizer"])
    f_sched.load_state_dict(saved["scheduler"])
    f_scaler.load_state_dict(saved["scaler"])
    for k in range(3, 6):
        _step(*original, k)
        _step(*fresh, k)
    for (n, a), b in zip(model.named_parameters(), f_model.parameters()):
        assert torch.equal(a, b), n
    assert sched.get_last_lr() == f_sched.get_last_lr() and scaler.get_scale() == f_scaler.get_scale()
    draws = lambda: (random.random(), float(np.random.normal()), float(torch.rand(1)))  # noqa: E731
    ckpt.set_rng_state(saved["progress"]["rng"])
    first = draws()
    ckpt.set_rng_state(saved["progress"]["rng"])
    assert draws() == first


def test_a_write_cut_short_leaves_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    save_resume_state(path, {"trainable": {}, "optimizer": {}, "scheduler": {}, "progress": {"step": 1}})

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the temporary file and the rename

    import samft.files

    monkeypatch.setattr(samft.files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_resume_state(path, {"trainable": {}, "optimizer": {}, "scheduler": {}, "progress": {"step": 2}})
    monkeypatch.undo()
    assert load_resume_state(path)["progress"]["step"] == 1


def _legacy_state() -> dict:
    objs = _training_objects()
    _step(*objs, 0)
    return _state(*objs)


def test_an_old_state_pt_is_read_without_unpickling_code(tmp_path):
    state = _legacy_state()
    torch.save(state, tmp_path / "state.pt")
    assert_same(state, load_resume_state(tmp_path / "state.pt"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # unpickling this creates the marker file


@pytest.mark.parametrize("container", ["torch_zip", "bare_pickle", "named_safetensors"])
def test_a_pickle_payload_never_runs(tmp_path, container):
    marker = tmp_path / "EXECUTED"
    state = {**_legacy_state(), "extra": _Payload(marker)}
    name = "state.safetensors" if container == "named_safetensors" else "state.pt"
    path = tmp_path / name
    if container == "bare_pickle":
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{name}: .*(never loads|not a readable samft state)"):
        load_resume_state(path)
    assert not marker.exists(), "the payload ran"
    with pytest.raises(CheckpointError):  # and the same through the old pickle module path torch offers
        load_resume_state(path)
    assert not marker.exists()


def test_the_payload_would_run_with_pickle(tmp_path):
    """The crafted file is a real payload (so the test above can fail)."""
    marker = tmp_path / "EXECUTED"
    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)
    assert marker.exists()


def _other_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    files = {}
    export = tmp_path / "model.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8)}, export)
    files["export"] = (export, "no trainable, optimizer, scheduler, progress")
    adapter = tmp_path / "adapter.safetensors"
    adapter.write_bytes(st_save({"w": torch.zeros(2)}, metadata={"format": "samft-adapter-1"}))
    files["adapter"] = (adapter, "metadata format 'samft-adapter-1'")
    rand = tmp_path / "random.bin"
    rand.write_bytes(os.urandom(4096))
    files["random"] = (rand, "neither a safetensors nor a PyTorch file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    files["empty"] = (empty, "neither a safetensors nor a PyTorch file")
    save_resume_state(tmp_path / "good.safetensors", _legacy_state())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-100])
    files["truncated"] = (cut, "not a valid safetensors file")
    tensors = st_load((tmp_path / "good.safetensors").read_bytes())
    dropped = tmp_path / "dropped.safetensors"
    meta = json.loads((tmp_path / "good.safetensors").read_bytes()[8:][:int.from_bytes(
        (tmp_path / "good.safetensors").read_bytes()[:8], "little")])["__metadata__"]
    first = sorted(tensors)[0]
    dropped.write_bytes(st_save({k: v for k, v in tensors.items() if k != first}, metadata=meta))
    files["missing_tensor"] = (dropped, f"tensor {first!r} is referenced but not stored")
    tagged = tmp_path / "tagged.safetensors"
    tagged.write_bytes(st_save(tensors, metadata={**meta, "state": meta["state"].replace('{"tuple"', '{"code"', 1)}))
    files["unknown_tag"] = (tagged, "unknown tag 'code'")
    return files


@pytest.mark.parametrize("kind", ["export", "adapter", "random", "empty", "truncated", "missing_tensor",
                                  "unknown_tag"])
def test_another_format_is_a_clear_error_naming_the_file(tmp_path, kind):
    path, message = _other_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as e:
        load_resume_state(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_a_non_finite_tensor_is_refused_by_name():
    from samft.model import build_model

    model = build_model(tiny_config("lora")).model
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    name = sorted(tensors)[1]
    tensors[name].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=rf"x.safetensors: tensor {name} holds 1 NaN/infinite value"):
        load_trainable(model, tensors, "x.safetensors")
