"""SLIP's SSL loss in training (samft.slip.terms, wired by samft.engine.train.slip): off is today's training bit for bit, on it trains the
adapter, the decoder and the projection head (never the frozen base), resumes exactly with the unlabelled
stream, keeps the head out of the adapter files, and runs from the command line."""

from __future__ import annotations

import pytest
import torch

import samft.engine.train.loop as train_mod
from samft.engine.artifacts.state import load_resume_state as load_state
from samft.engine.artifacts.adapter import read_adapter
from samft.engine.artifacts.metrics_csv import read_metrics
from samft.engine.train.setup import build_training
from samft.slip.terms import ssl_stream
from samft.engine.train.loop import TrainingInterrupted, train
from samft.errors import SamftError

from conftest import classes_dir, tiny_config


def _cfg(tmp_path, data_dir, name, weight=0.0, unlabelled=True, **train_opts):
    opts = {"epochs": 2, "batch_size": 4, "accum_steps": 2, "lr": 1e-3, "log_every": 1, "save_every": 0,
            "progress": False, "device": "cpu", "seed": 5, **train_opts}
    data = {"root": str(data_dir), "train": ".", "val_fraction": 0.25}
    if unlabelled:
        data["unlabelled"] = ["images/001[0-6].png"]  # 7 images: batches of 3, one incomplete batch dropped
    return tiny_config("conv_lora", data=data, train=opts, output={"dir": str(tmp_path / name)},
                       loss={"ssl": {"weight": weight, "batch_size": 3, "mlp_dim": 24, "emb_dim": 8}})


def _untimed(run):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in read_metrics(run / "metrics.csv")]


def _same_adapters(a, b, name="adapter_last.safetensors"):
    ta, tb = read_adapter(a / name)[0], read_adapter(b / name)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_weight_zero_is_bit_identical_to_a_run_without_the_option(tmp_path, synthetic_dir):
    plain = train(_cfg(tmp_path, synthetic_dir, "plain", unlabelled=False), show_progress=False)
    with pytest.warns(UserWarning, match="unlabelled images are not used"):
        off = train(_cfg(tmp_path, synthetic_dir, "off", weight=0.0), show_progress=False)
    assert _same_adapters(plain, off) and _same_adapters(plain, off, "adapter.safetensors")
    assert _untimed(plain) == _untimed(off)
    assert "extra_modules" in load_state(off / "state.safetensors") and not load_state(off / "state.safetensors")["extra_modules"]


def test_ssl_trains_adapter_decoder_and_head_never_the_base(tmp_path, synthetic_dir):
    cfg = _cfg(tmp_path, synthetic_dir, "x", weight=1.0)
    stream = ssl_stream(cfg)
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=2)
    head = parts.extra_modules["unlabelled"]
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    head_before = {n: p.detach().clone() for n, p in head.named_parameters()}
    batch = next(iter(torch.utils.data.DataLoader(stream.dataset, batch_size=3)))
    labelled = {"image": torch.randn(2, 3, 64, 64), "mask": torch.rand(2, 64, 64) > 0.5,
                "valid_hw": torch.tensor([[64, 64]] * 2)}
    stats = train_mod.train_step(parts, [{"labelled": labelled, "unlabelled": batch}])
    assert stats["aux_ssl"] > 0
    changed = {n for n, p in parts.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any(".lora" in n or "conv_lora" in n or "experts" in n for n in changed), sorted(changed)[:5]
    assert all(not torch.equal(p.detach(), head_before[n]) for n, p in head.named_parameters())
    assert len(parts.optimizer.param_groups[0]["params"]) + len(parts.optimizer.param_groups[1]["params"]) == \
        len(parts.trainable_parameters()) == len(trainable) + len(list(head.parameters()))


def test_the_ssl_gradient_reaches_the_adapter_through_the_loop(tmp_path, synthetic_dir):
    """Only the SSL term: with the task loss and balance loss zeroed, the adapter still moves."""
    cfg = _cfg(tmp_path, synthetic_dir, "g", weight=1.0)
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=2)
    parts.task.loss = lambda *a, **k: torch.zeros((), requires_grad=True)
    model_term = next(t for t in parts.terms if t.name == "model")
    model_term.weights.update({name: 0.0 for name in model_term.weights})
    assert parts.weights["balance"] == 0.0
    encoder_before = {n: p.detach().clone() for n, p in parts.model.image_encoder.named_parameters()}
    batch = next(iter(torch.utils.data.DataLoader(ssl_stream(cfg).dataset, batch_size=3)))
    labelled = {"image": torch.randn(2, 3, 64, 64), "mask": torch.rand(2, 64, 64) > 0.5,
                "valid_hw": torch.tensor([[64, 64]] * 2)}
    train_mod.train_step(parts, [{"labelled": labelled, "unlabelled": batch}])
    moved = {n for n, p in parts.model.image_encoder.named_parameters() if not torch.equal(p.detach(), encoder_before[n])}
    frozen = {n for n, p in parts.model.image_encoder.named_parameters() if not p.requires_grad}
    assert moved and not (moved & frozen)


def test_a_run_with_ssl_logs_it_keeps_the_head_out_of_adapters_and_resumes_exactly(tmp_path, synthetic_dir,
                                                                                    monkeypatch):
    straight = train(_cfg(tmp_path, synthetic_dir, "s", weight=1.0), show_progress=False)
    steps = [r for r in read_metrics(straight / "metrics.csv") if r["kind"] == "step"]
    assert steps and all(float(r["aux_ssl"]) > 0 for r in steps)
    plain = train(_cfg(tmp_path, synthetic_dir, "p", unlabelled=False), show_progress=False)
    assert not _same_adapters(plain, straight)  # the SSL loss changed the training
    for name in ("adapter.safetensors", "adapter_last.safetensors"):
        assert read_adapter(straight / name)[0].keys() == read_adapter(plain / name)[0].keys()
    state = load_state(straight / "state.safetensors")
    assert set(state["extra_modules"]) == {"unlabelled"} and "mlp.layer1.weight" in state["extra_modules"]["unlabelled"]

    real, calls = train_mod.train_step, {"n": 0}

    def stop_after_three(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", stop_after_three)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, synthetic_dir, "r", weight=1.0), show_progress=False)
    # epoch 1's 3 steps take 5 micro-batches (18 images in 4s, accum 2); 7 unlabelled images in batches of
    # 3, the incomplete one dropped: 2 batches an epoch, so the 5th batch is the first of its third epoch
    assert load_state(tmp_path / "r" / "state.safetensors")["progress"]["streams"]["unlabelled"] == {"epoch": 2, "consumed": 3}
    monkeypatch.undo()
    train(_cfg(tmp_path, synthetic_dir, "r", weight=1.0), resume=True, show_progress=False)
    assert _same_adapters(straight, tmp_path / "r") and _same_adapters(straight, tmp_path / "r", "adapter.safetensors")
    assert _untimed(straight) == _untimed(tmp_path / "r")
    heads = [load_state(run / "state.safetensors")["extra_modules"]["unlabelled"] for run in (straight, tmp_path / "r")]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_too_few_unlabelled_images_is_one_clear_line(tmp_path, synthetic_dir):
    cfg = _cfg(tmp_path, synthetic_dir, "few", weight=1.0)
    cfg.loss.ssl.batch_size = 8
    with pytest.raises(SamftError, match=r"loss.ssl.batch_size: 8 is more than the 7 unlabelled images"):
        train(cfg, show_progress=False)


# ------------------------------------------------------------------------------------------ region-text loss

def _voc_cfg(tmp_path, name, weight=1.0, method="lora", **train_opts):
    import numpy as np

    emb = tmp_path / "names.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    root = tmp_path / "classes"
    if not root.is_dir():
        classes_dir(root)
    opts = {"epochs": 1, "batch_size": 2, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
            **train_opts}
    return tiny_config(method, model={"num_mask_tokens": 4, "text": {"embeddings": str(emb)}},
                       data={"root": str(root), "train": ".", "classes": ["background", "a", "b"],
                             "val_fraction": 0.25},
                       loss={"clip": {"weight": weight}}, train=opts, output={"dir": str(tmp_path / name)})


def test_region_text_term_is_the_loss_of_the_labelled_forward_with_padding_ignored(tmp_path):
    from samft.engine.artifacts.adapter import trainable_state
    from samft.slip.text import region_text_loss

    cfg = _voc_cfg(tmp_path, "unit", weight=0.5, grad_clip=0.0)
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=2)
    head = parts.extra_modules["clip"]
    assert parts.weights == {"clip": 0.5} and parts.loss_names == ["clip"]
    g = torch.Generator().manual_seed(3)
    mask = torch.randint(0, 2, (2, 64, 64), generator=g)
    mask[:, :8] = 255  # ignored pixels
    mask[1, :, 48:] = 2  # class 2 only in image 1's padding: it must not become a region
    batch = {"image": torch.randn(2, 3, 64, 64, generator=g), "mask": mask,
             "valid_hw": torch.tensor([[64, 64], [64, 48]])}
    with torch.no_grad():
        feats = parts.model(batch["image"]).features
        gt = mask.clone()
        gt[1, :, 48:] = 255
        expected = float(region_text_loss(feats, gt, 255, head.proj, head.text_emb, head.logit_scale))
        padded = float(region_text_loss(feats, mask, 255, head.proj, head.text_emb, head.logit_scale))
    assert abs(expected - padded) > 1e-4, "the padding must matter for this test to mean anything"
    head_before = {n: p.detach().clone() for n, p in head.named_parameters()}
    encoder_before = {n: p.detach().clone() for n, p in parts.model.image_encoder.named_parameters()}
    stats = train_mod.train_step(parts, [{"labelled": batch}])
    assert stats["aux_clip"] == pytest.approx(expected, rel=1e-5)
    assert stats["loss"] == pytest.approx(stats["task_loss"] + 0.5 * expected, rel=1e-5)
    assert all(not torch.equal(p.detach(), head_before[n]) for n, p in head.named_parameters())
    moved = {n for n, p in parts.model.image_encoder.named_parameters() if not torch.equal(p.detach(), encoder_before[n])}
    assert moved and all(parts.model.image_encoder.get_parameter(n).requires_grad for n in moved)
    assert not any(n.startswith("proj") or "logit_scale" in n for n in trainable_state(parts.model))


def test_a_run_with_the_region_text_loss_logs_it_and_keeps_its_head_out_of_the_adapter(tmp_path):
    run = train(_voc_cfg(tmp_path, "clip"), show_progress=False)
    steps = [r for r in read_metrics(run / "metrics.csv") if r["kind"] == "step"]
    assert steps and all(float(r["aux_clip"]) > 0 for r in steps)
    plain = build_training(_voc_cfg(tmp_path, "plain", weight=0.0), torch.device("cpu"), "fp32", 2)
    from samft.engine.artifacts.adapter import trainable_state

    assert set(read_adapter(run / "adapter.safetensors")[0]) == set(trainable_state(plain.model))
    assert set(load_state(run / "state.safetensors")["extra_modules"]["clip"]) == {"proj.weight", "text_emb", "logit_scale"}


def test_cli_trains_with_unlabelled_images(tmp_path, synthetic_dir):
    from typer.testing import CliRunner

    from samft.cli import app

    import yaml

    cfg = _cfg(tmp_path, synthetic_dir, "cli", unlabelled=False, epochs=1)
    config = tmp_path / "cfg.yaml"
    from samft.config import dump_yaml

    config.write_text(dump_yaml(cfg))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--no-progress",
                                      'data.unlabelled=["images/000?.png"]', "loss.ssl.weight=0.5"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "cli"
    assert "SSL loss: 10 unlabelled images" in result.output
    assert all(float(r["aux_ssl"]) > 0 for r in read_metrics(run / "metrics.csv") if r["kind"] == "step")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["ssl"]["weight"] == 0.5 and saved["data"]["unlabelled"] == ["images/000?.png"]
    assert "unlabelled" in load_state(run / "state.safetensors")["extra_modules"]


def test_compare_methods_with_and_without_the_ssl_loss(synthetic_dir, tmp_path, monkeypatch):
    from conftest import TINY, load_script

    import json

    import yaml

    config = {"model": TINY, "peft": {"method": "lora"},
              "data": {"root": str(synthetic_dir), "train": ".", "val_fraction": 0.25, "num_workers": 0,
                       "unlabelled": ["images"]},
              "loss": {"ssl": {"batch_size": 4, "mlp_dim": 16, "emb_dim": 8}},
              "train": {"epochs": 1, "batch_size": 6, "device": "cpu"}, "eval": {"batch_size": 6}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cm = load_script("compare_methods")
    assert cm.main(["--config", "c.yaml", "--methods", "lora", "--seeds", "3", "--out", "cmp.md", "--workdir", "runs",
                    "--ssl-weight", "0.5", "--in-process"]) == 0
    rows = [line.split("|")[1].strip() for line in (tmp_path / "cmp.md").read_text().splitlines() if line.startswith("| `")]
    assert rows == ["`lora`", "`lora+ssl`"]
    raw = json.loads((tmp_path / "cmp.json").read_text())
    assert [(r["method"], r["ssl_weight"]) for r in raw] == [("lora", 0.0), ("lora+ssl", 0.5)]
    assert raw[1]["request"]["overrides"][-1] == "loss.ssl.weight=0.5"
    ssl_rows = read_metrics(tmp_path / "runs" / "lora+ssl" / "seed3" / "metrics.csv")
    assert all(float(r["aux_ssl"]) > 0 for r in ssl_rows if r["kind"] == "step")


def test_ssl_under_torchrun_shards_the_unlabelled_images_in_equal_full_batches(tmp_path, synthetic_dir):
    """No refusal under torchrun; each process draws the same number of full batches of its own images
    (DistributedSampler + drop_last), and fewer images per process than one batch is one clear line.
    (DDP training itself: tests/test_slip_ddp.py.)"""
    from types import SimpleNamespace

    from samft.engine import distributed as D
    from samft.engine.train.slip import config_streams
    from samft.engine.train.streams import StreamCursor

    cfg = _cfg(tmp_path, synthetic_dir, "ddp", weight=1.0)  # 7 unlabelled images, batches of 3
    [stream] = config_streams(SimpleNamespace(cfg=cfg, info=D.DistInfo(rank=0, world_size=2), main=False))
    per_rank = []
    for rank in range(2):
        cursor = StreamCursor(stream.name, stream.dataset, stream.batch_size, 5, D.DistInfo(rank=rank, world_size=2),
                              0, None, False, drop_last=True)
        epoch = []
        while cursor.epoch == 0:
            batch = cursor.next()
            if cursor.epoch == 0:
                epoch.append(batch["index"].tolist())
        per_rank.append(epoch)
    # 7 images over 2 processes: 4 each (one repeated to even the shares), one batch of 3, the rest dropped
    assert [[len(b) for b in epoch] for epoch in per_rank] == [[3], [3]]
    assert len({i for epoch in per_rank for b in epoch for i in b}) >= 5, "the processes draw different images"
    cfg.loss.ssl.batch_size = 5
    assert ssl_stream(cfg, world_size=1) is not None
    with pytest.raises(SamftError, match=r"^loss.ssl.batch_size: 5 is more than the 7 unlabelled images of "
                                         r"data.unlabelled per process \(4 each of 2 processes\)"):
        ssl_stream(cfg, world_size=2)


def test_training_only_modules_get_synchronised_batchnorm_under_torchrun_and_are_in_the_step_module():
    """_bind_modules: BatchNorm1d becomes DistBatchNorm1d when distributed (same tensors), nothing changes in
    one process, another BatchNorm kind is refused naming the stream; TrainingModule holds the heads by name
    and refuses a name used twice."""
    from torch import nn

    from samft.engine import distributed as D
    from samft.engine.train.setup import _bind_modules
    from samft.engine.train.step import TrainingModule
    from samft.slip.ssl import DistBatchNorm1d, SSLHead
    from samft.tasks.terms import LossTerm

    def stream(modules, name="u"):
        return LossTerm(name, lambda m, o, b: {}, {}, stream="u", modules=modules)

    head = SSLHead(8, 12, 4)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    [one] = _bind_modules([stream(lambda model: head)], None, torch.device("cpu"), D.DistInfo())
    assert one.modules is head and type(head.mlp.bn1) is nn.BatchNorm1d
    [two] = _bind_modules([stream(head)], None, torch.device("cpu"), D.DistInfo(rank=1, world_size=2))
    assert two.modules is head and isinstance(head.mlp.bn1, DistBatchNorm1d) and isinstance(head.mlp.bn2, DistBatchNorm1d)
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items())
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(SamftError, match=r"^loss term / data stream 'u': 1 is a BatchNorm2d, which cannot be "
                                         r"synchronised across processes"):
        _bind_modules([stream(conv)], None, torch.device("cpu"), D.DistInfo(rank=0, world_size=2))
    region = nn.Linear(2, 2)
    module = TrainingModule(nn.Linear(1, 1), [LossTerm("clip", lambda m, o, b: {}, {}, modules=region), two])
    assert dict(module.heads) == {"clip": region, "u": head}
    assert {id(p) for p in module.parameters()} >= {id(p) for p in (*region.parameters(), *head.parameters())}
    with pytest.raises(SamftError, match=r"^loss term / data stream 'u': the name is taken"):
        TrainingModule(nn.Linear(1, 1), [two, two])
