"""SLIP's two losses under DDP: two gloo processes, each with ``DistributedDataParallel(TrainingModule)``
built by the real ``build_training`` (the real SSLTerm and RegionTerm) on its half of the batch, against
one process; then the real command line under torchrun with both losses on."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest
import torch
import yaml

from samft.config import config_from_dict, dump_yaml
from samft.engine import distributed as D

from conftest import classes_dir, perturb_trainable, tiny_config

WORLD = 2
N = 4  # labelled images and unlabelled images of the union batch (2 per process)


def _config(tmp_path, **train):
    """Tiny multi-class LoRA (no auxiliary loss) with both SLIP losses; the data is real files (the stream
    and the class-name embeddings are read as in a run)."""
    root = classes_dir(tmp_path / "classes")
    emb = tmp_path / "names.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    return tiny_config("lora", model={"num_mask_tokens": 4, "text": {"embeddings": str(emb)}},
                       data={"root": str(root), "train": ".", "classes": ["background", "a", "b"],
                             "val_fraction": 0.25, "unlabelled": ["images"]},
                       loss={"ssl": {"weight": 1.0, "batch_size": N // WORLD, "mlp_dim": 24, "emb_dim": 8,
                                     "temperature": 0.2},
                             "clip": {"weight": 1.0}},
                       train={"device": "cpu", "seed": 3, **train})


def _inputs():
    """The union batch: labelled images (N, 3, 64, 64) with class-id masks, and two views of N unlabelled images."""
    g = torch.Generator().manual_seed(11)
    labelled = {"image": torch.randn(N, 3, 64, 64, generator=g), "mask": torch.randint(0, 3, (N, 64, 64), generator=g),
                "valid_hw": torch.tensor([[64, 64]] * N)}
    labelled["mask"][:, :6] = 255  # some ignored pixels
    views = torch.randn(2, N, 3, 64, 64, generator=g)
    return labelled, {"view1": views[0], "view2": views[1]}


def _share(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def _build(cfg, info):
    """build_training as Fit calls it, with trainable tensors moved off their initialisation (zero LoRA B,
    BatchNorm at (1, 0)) so that every one of them gets a gradient that matters."""
    from samft.engine.train.setup import build_training

    torch.manual_seed(cfg.train.seed)  # the tiny SAM's random weights, as prepare_run seeds them
    parts = build_training(cfg, torch.device("cpu"), "fp32", 2, info)  # SLIP's terms come from cfg
    perturb_trainable(parts.trainable_parameters())
    return parts


def _losses(parts, labelled, unlabelled):
    """One call of the step's module -> (ssl term, clip term, a zero that ties in every other output)."""
    out, terms = parts.module(labelled["image"], {"labelled": labelled, "unlabelled": unlabelled})
    zero = 0.0 * (out.masks.float().sum() + out.class_logits.float().sum())
    return terms["ssl"], terms["clip"], zero


def _grads(parts) -> dict:
    named = {f"model.{n}": p for n, p in parts.model.named_parameters() if p.requires_grad}
    named.update({f"{k}.{n}": p for k, m in parts.extra_modules.items() for n, p in m.named_parameters()})
    return {n: p.grad.detach().clone() for n, p in named.items()}


# (ii) region-text, (iii) region-text with no labelled pixel in rank 1's share, (i) SSL: each step's
# backward of one term (the others x 0, so that DDP's reducer sees a gradient for every parameter); a step
# that leaves a reduction unfinished (a parameter without gradient on one process) fails the next forward
STEPS = ("clip", "empty", "ssl")


def _step_inputs() -> tuple[dict, dict]:
    labelled, unlabelled = _inputs()
    empty = {**labelled, "mask": labelled["mask"].clone()}
    empty["mask"][N // WORLD:] = 255  # rank 1's share: nothing labelled, so no region
    return {"clip": labelled, "empty": empty, "ssl": labelled}, unlabelled


def _backward(parts, step: str, labelled: dict, unlabelled: dict, scale: float = 1.0) -> torch.Tensor:
    """Backward of ``scale`` x the step's term (+ 0 x the rest); returns the term."""
    ssl, clip, zero = _losses(parts, labelled, unlabelled)
    term, other = (ssl, clip) if step == "ssl" else (clip, ssl)
    (scale * (term + 0.0 * other + zero)).backward()
    return term.detach()


def _ddp_worker(rank: int, world: int, init_file: str, cfg_yaml: str, out_file: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from samft.slip.ssl import DistBatchNorm1d

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    parts = _build(config_from_dict(yaml.safe_load(cfg_yaml)), D.DistInfo(rank=rank, world_size=world))
    labelled, unlabelled = _step_inputs()
    lo, hi = rank * N // world, (rank + 1) * N // world
    result = {}
    for step in STEPS:
        loss = _backward(parts, step, _share(labelled[step], lo, hi), _share(unlabelled, lo, hi))
        dist.all_reduce(loss)  # the mean over the processes, as the metrics average it
        result[f"{step}.loss"] = loss / world
        result.update({f"{step}.grad.{n}": g for n, g in _grads(parts).items()})
        parts.optimizer.zero_grad(set_to_none=True)
    ddp, head = parts.module, parts.extra_modules["unlabelled"]
    result["wrapped"] = torch.tensor([isinstance(ddp, DistributedDataParallel),
                                      isinstance(head.mlp.bn1, DistBatchNorm1d),
                                      {id(p) for p in ddp.parameters()} >= {id(p) for p in parts.trainable_parameters()}])
    if rank == 0:
        torch.save(result, out_file)
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo threads joined by C++ destructors there sometimes abort


def _one_process(cfg) -> tuple[dict, dict]:
    """The same steps in one process: (i) the SSL term of the union batch; (ii), (iii) (L_0 + L_1) / 2 of the
    region-text terms of each process's share. Also returns rank 0's own (un-averaged) gradient of (ii)."""
    parts = _build(cfg, D.DistInfo())
    labelled, unlabelled = _step_inputs()
    want, rank0_alone = {}, {}
    for step in STEPS:
        if step == "ssl":
            want[f"{step}.loss"] = _backward(parts, step, labelled[step], unlabelled)
        else:
            losses = []
            for r in range(WORLD):
                lo, hi = r * N // WORLD, (r + 1) * N // WORLD
                losses.append(_backward(parts, step, _share(labelled[step], lo, hi), _share(unlabelled, lo, hi),
                                        1 / WORLD))
                if step == "clip" and r == 0:
                    rank0_alone = {n: g * WORLD for n, g in _grads(parts).items()}
            want[f"{step}.loss"] = sum(losses) / WORLD
        want.update({f"{step}.grad.{n}": g for n, g in _grads(parts).items()})
        parts.optimizer.zero_grad(set_to_none=True)
    return want, rank0_alone


def test_ddp_gradients_of_both_slip_losses_equal_one_process(tmp_path):
    """(i) SSL: DDP's averaged gradient is that of NT-Xent on the union batch (gathered negatives, BatchNorm
    over both processes); (ii) region-text: the gradient of (L_rank0 + L_rank1) / 2; (iii) the same when one
    process's share has no region (its term is 0 and its head still takes part in the reduction). Every
    trainable tensor (adapter, decoder, the SSL head, the region-text head): rtol 1e-4, atol 1e-6 x the
    step's largest gradient (float32 summed in another order; a Linear bias before BatchNorm has a zero
    gradient up to rounding, which no relative tolerance compares). The decoder takes no part in either
    loss: its gradient is 0 on both sides."""
    import torch.multiprocessing as mp

    cfg = _config(tmp_path)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(WORLD, str(tmp_path / "init"), dump_yaml(cfg), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    want, rank0_alone = _one_process(cfg)

    names = {k[len("ssl.grad."):] for k in want if k.startswith("ssl.grad.")}
    assert {k[len("ssl.grad."):] for k in got if k.startswith("ssl.grad.")} == names
    assert any(".lora" in n for n in names) and any(n.startswith("unlabelled.mlp.bn") for n in names)
    assert any(n.startswith("clip.") for n in names) and any(n.startswith("model.decoder.") for n in names)
    for step, label in zip(STEPS, ("(ii) region-text", "(iii) region-text, no region on rank 1", "(i) SSL")):
        assert float(got[f"{step}.loss"]) == pytest.approx(float(want[f"{step}.loss"]), rel=1e-5), label
        scale = max(float(want[f"{step}.grad.{n}"].abs().max()) for n in names)
        for name in sorted(names):
            torch.testing.assert_close(got[f"{step}.grad.{name}"], want[f"{step}.grad.{name}"], rtol=1e-4,
                                       atol=1e-6 * scale, msg=lambda m: f"{label}, {name}: {m}")
    # the checks mean something: each gradient reaches the adapter and its head, and a process's own
    # gradient differs from the average (an un-averaged head would be caught)
    for key in ("ssl.grad.unlabelled.mlp.layer1.weight", "ssl.grad.unlabelled.mlp.bn1.weight",
                "clip.grad.clip.proj.weight", "empty.grad.clip.proj.weight"):
        assert got[key].abs().sum() > 0, key
    for step in STEPS:
        assert sum(float(got[f"{step}.grad.{n}"].abs().sum()) for n in names if ".lora" in n) > 0, step
    for name in ("clip.proj.weight", "clip.logit_scale"):
        assert not torch.allclose(rank0_alone[name], want[f"clip.grad.{name}"], rtol=1e-2), name
    assert got["wrapped"].all(), "DDP(TrainingModule) holding every trainable tensor, the SSL head's BatchNorm synchronised"


def test_both_slip_losses_train_under_torchrun(tmp_path):
    """The real command line, 2 processes on gloo, with the text class head too: both losses logged, one digest
    for the weights (the class head's included) and one for the heads, no loss head tensor in the adapter."""
    from samft.engine.artifacts.state import load_resume_state
    from samft.engine.artifacts.adapter import read_adapter
    from samft.engine.distributed import tensors_sha256

    from test_distributed import torchrun

    cfg = _config(tmp_path, epochs=1, max_steps=2, batch_size=2, lr=1e-3, log_every=1, save_every=0,
                  grad_checkpointing=True)
    cfg.output.dir = str(tmp_path / "runs" / "slip")
    cfg.model.class_head = "text"
    (tmp_path / "slip.yaml").write_text(dump_yaml(cfg))
    proc = torchrun("train", "--config", "slip.yaml", "--no-progress", cwd=tmp_path)
    out = " ".join((proc.stdout + proc.stderr).split())  # the console may wrap long lines
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu x 2 processes" in out and "SSL loss: 8 unlabelled images, 4 per process, batches of 2" in out
    assert "all 2 processes hold identical trainable weights (sha256 " in out
    assert "and training-only modules clip, unlabelled (sha256 " in out
    run = tmp_path / "runs" / "slip"
    with open(run / "metrics.csv", newline="") as f:
        steps = [r for r in csv.DictReader(f) if r["kind"] == "step"]
    assert len(steps) == 2 and all(float(r["aux_ssl"]) > 0 and float(r["aux_clip"]) > 0 for r in steps)
    tensors, meta = read_adapter(run / "adapter_last.safetensors")
    digest = out.split("identical trainable weights (sha256 ", 1)[1][:64]
    assert tensors_sha256(tensors) == digest and meta["step"] == "2"
    assert {k.split(".")[0] for k in tensors} == {"image_encoder", "decoder"}, "no head tensor in the adapter"
    assert "decoder.class_head.text_emb" in tensors and "decoder.class_head.no_object" in tensors
    assert "is deprecated" not in out, "torch's collectives warn once per process and call site"
    heads = load_resume_state(run / "state.safetensors")["extra_modules"]
    assert set(heads) == {"clip", "unlabelled"} and "mlp.bn1.running_mean" in heads["unlabelled"]
    heads_digest = out.split("training-only modules clip, unlabelled (sha256 ", 1)[1][:64]
    params = {f"{name}.{k}": v for name, m in heads.items() for k, v in m.items()
              if not k.startswith("text_emb") and "running_" not in k and "num_batches" not in k}
    assert tensors_sha256(params) == heads_digest, "rank 0's saved heads are the heads both ranks hold"
