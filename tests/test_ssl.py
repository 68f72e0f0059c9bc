"""SLIP's self-supervised branch: NT-Xent, the projection head, gradients through the PEFT-adapted encoder,
DDP with gathered embeddings, and the unlabelled image stream."""

from __future__ import annotations

import csv
import math
import os
import warnings

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from samft.config import config_from_dict
from samft.data.unlabelled import unlabelled_images
from samft.slip.augment import TwoViewTransform, UnlabelledDataset
from samft.errors import ConfigError, DataError
from samft.model import build_model
from samft.peft import get as get_method
from samft.slip.ssl import (DistBatchNorm1d, SSLHead, convert_sync_batchnorm, nt_xent, ssl_features, ssl_loss)

from conftest import METHODS, perturb_trainable, tiny_config


def brute_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's loss written per anchor: -log( exp(s(i, twin)/t) / sum_{k != i} exp(s(i, k)/t) ), averaged
    over the 2N anchors of both views; s is the cosine similarity."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        twin = (i + n2 // 2) % n2
        sims = [float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) for k in range(n2)]
        den = sum(math.exp(sims[k] / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(sims[twin] / t) / den)
    return torch.tensor(total / n2)


@pytest.mark.parametrize("n, t", [(2, 0.1), (5, 0.5), (8, 0.07)])
def test_nt_xent_equals_the_per_anchor_formula(n, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    assert float(nt_xent(z1, z2, t)) == pytest.approx(float(brute_nt_xent(z1, z2, t)), rel=1e-5)
    # identical views: the positive is the most similar key, so the loss is lower than for unrelated views
    assert float(nt_xent(z1, z1 * 3.0, t)) < float(nt_xent(z1, z2, t))


def test_projection_head_is_slips_mlp():
    head = SSLHead(32, 64, 16)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [head.mlp.layer1.in_features, head.mlp.layer2.in_features, head.mlp.layer3.out_features] == [32, 64, 16]
    assert head(torch.randn(4, 32)).shape == (4, 16)


def test_dist_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    head = SSLHead(8, 12, 4)
    with torch.no_grad():
        head.mlp.bn1.weight.uniform_(0.5, 1.5)
        head.mlp.bn1.bias.uniform_(-1, 1)
    plain = SSLHead(8, 12, 4)
    plain.load_state_dict(head.state_dict())
    convert_sync_batchnorm(head)
    assert isinstance(head.mlp.bn1, DistBatchNorm1d) and isinstance(head.mlp.bn2, DistBatchNorm1d)
    assert set(head.state_dict()) == set(plain.state_dict())
    x = torch.randn(6, 8)
    assert torch.equal(head(x), plain(x))
    assert torch.equal(head.mlp.bn1.running_var, plain.mlp.bn1.running_var)


@pytest.mark.parametrize("method", METHODS)
def test_ssl_gradients_reach_the_adapter_and_not_the_frozen_base(method):
    torch.manual_seed(0)
    model = build_model(tiny_config(method)).model.train()
    perturb_trainable(model, scale=0.02)
    head = SSLHead(32, 64, 16)
    views = torch.randn(2, 3, 3, 64, 64)
    loss = ssl_loss(model, head, views[0], views[1], 0.1)
    loss.backward()
    assert torch.isfinite(loss)
    encoder = dict(model.image_encoder.named_parameters())
    trained = {n for n, p in encoder.items() if p.requires_grad}
    reached = {n for n, p in encoder.items() if p.grad is not None}
    assert reached <= trained, f"frozen base parameters got gradients: {sorted(reached - trained)[:5]}"
    assert all(p.grad is None for p in model.decoder.parameters()), "the SSL loss does not use the decoder"
    assert all(p.grad is None for p in model.prompt_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    if not get_method(method).adapts_encoder:
        assert not trained and not reached
        return
    assert reached, f"{method}: the SSL loss reached no adapter parameter"
    if not get_method(method).unused_params:
        assert reached == trained, f"{method}: no gradient for {sorted(trained - reached)[:5]}"
    assert sum(float(encoder[n].grad.abs().sum()) for n in reached) > 0
    assert not any(hasattr(m, "aux_loss") for m in model.modules()), "nothing is stored on the PEFT layers"


def test_ssl_features_pool_the_neck():
    torch.manual_seed(0)
    model = build_model(tiny_config("lora")).model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ssl_features(model, images), model.encode(images).mean(dim=(2, 3)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes against one process on the union batch
# ---------------------------------------------------------------------------------------------


class _Bundle(nn.Module):
    """What the training loop wraps in DDP: the model and the SSL head, the SSL loss in one forward."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return ssl_loss(self.model, self.head, view1, view2, 0.2)


def _bundle() -> _Bundle:
    torch.manual_seed(0)
    model = build_model(tiny_config("lora")).model.train()
    perturb_trainable(model, scale=0.02)
    head = convert_sync_batchnorm(SSLHead(32, 48, 16))
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), so that their gradients matter
        for bn in (head.mlp.bn1, head.mlp.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return _Bundle(model, head)


def _views() -> torch.Tensor:
    return torch.randn(2, 6, 3, 64, 64, generator=torch.Generator().manual_seed(7))  # 2 views x 6 images


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ddp = DDP(_bundle(), find_unused_parameters=True)  # the decoder takes no part in the SSL loss
        views = _views()
        share = views.shape[1] // world
        mine = views[:, rank * share:(rank + 1) * share]
        loss = ddp(mine[0], mine[1])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        try:
            nt_xent(torch.randn(2 + rank, 4), torch.randn(2 + rank, 4))
            unequal = ""
        except ValueError as e:
            unequal = str(e)
        if rank == 0:
            inner = ddp.module
            grads = {n: p.grad for n, p in inner.named_parameters() if p.grad is not None}
            stats = {f"buffer.{n}": b.float() for n, b in inner.head.named_buffers()}
            torch.save({"unequal": unequal, "loss": mean_loss, "local_loss": loss.detach(), **{f"grad.{n}": g for n, g in grads.items()},
                        **stats}, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_gathered_loss_and_gradients_equal_the_union_batch(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["unequal"] == ("the SSL batch differs between processes (2 to 3 images): the unlabelled loader "
                              "must drop its last incomplete batch")

    bundle = _bundle()
    views = _views()
    loss = bundle(views[0], views[1])
    loss.backward()
    assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(got["local_loss"]) != pytest.approx(float(loss.detach()), rel=1e-3), "each rank sees only its share"
    grads = {n: p.grad for n, p in bundle.named_parameters() if p.grad is not None}
    assert {k[len("grad."):] for k in got if k.startswith("grad.")} == set(grads)
    assert any(n.startswith("model.image_encoder") for n in grads) and any(n.startswith("head.") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(got[f"grad.{name}"], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, b in bundle.head.named_buffers():  # running statistics of the whole batch
        torch.testing.assert_close(got[f"buffer.{name}"], b.float(), rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# The unlabelled stream
# ---------------------------------------------------------------------------------------------


def _write_images(folder, n: int, seed: int = 0, size=(40, 30)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_unlabelled_views_are_deterministic_per_seed_epoch_index(tmp_path):
    paths = _write_images(tmp_path / "frames", 3)
    ds = UnlabelledDataset(paths, img_size=32, seed=5)
    first = ds[1]
    assert first["view1"].shape == first["view2"].shape == (3, 32, 32) and first["index"] == 1
    assert not torch.equal(first["view1"], first["view2"]), "two different views"
    again = UnlabelledDataset(paths, img_size=32, seed=5)
    again[0], again[2]  # other items drawn first: no shared random state
    for key in ("view1", "view2"):
        assert torch.equal(again[1][key], first[key])
    assert not torch.equal(ds[2]["view1"], first["view1"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["view1"], first["view1"]), "a new epoch, new views"
    ds.set_epoch(0)
    assert torch.equal(ds[1]["view1"], first["view1"]), "back to epoch 0 (resume): the same views"
    other_seed = UnlabelledDataset(paths, img_size=32, seed=6)
    assert not torch.equal(other_seed[1]["view1"], first["view1"])


def test_two_view_transform_is_normalised_like_sam():
    from samft.constants import PIXEL_MEAN, PIXEL_STD

    grey = np.full((20, 30, 3), 77, dtype=np.uint8)  # a flat image stays flat under crop, blur and flip
    views = TwoViewTransform(16)(grey, seed=3)
    assert views["view1"].shape == (3, 16, 16)
    # every jitter/greyscale choice keeps a flat image flat: each channel is one value, normalised as SAM
    for v in views.values():
        for c in range(3):
            assert torch.allclose(v[c], v[c, 0, 0].expand(16, 16), atol=1e-5)
    plain = TwoViewTransform(16)
    plain.augment = A.Compose([])
    same = plain(np.full((16, 16, 3), 77, dtype=np.uint8), seed=0)["view1"]
    expected = torch.tensor([(77 - m) / s for m, s in zip(PIXEL_MEAN, PIXEL_STD)])
    assert torch.allclose(same[:, 0, 0], expected, atol=1e-4)


def test_a_corrupt_unlabelled_image_is_named(tmp_path):
    paths = _write_images(tmp_path / "frames", 2)
    bad = tmp_path / "frames" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = UnlabelledDataset([*paths, bad], img_size=32, seed=0)
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        ds[2]


def test_data_check_covers_the_unlabelled_images(tmp_path, synthetic_dir):
    from samft.data.check import check_data

    _write_images(tmp_path / "frames", 3)
    (tmp_path / "frames" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = config_from_dict({"data": {"root": str(synthetic_dir), "train": ".", "num_workers": 0,
                                     "unlabelled": [str(tmp_path / "frames")]}})
    for mode in ("full", "quick"):
        report = check_data(cfg, mode, show_progress=False)
        unlabelled = report.splits[-1]
        assert unlabelled.name == "unlabelled" and unlabelled.pairs == 4
        assert len(report.problems) == 1 and "broken.jpg: cannot read" in report.problems[0], report.problems
        assert unlabelled.as_dict()["image_sizes"] == "all 40x30"
    cfg.data.unlabelled = [str(tmp_path / "nowhere")]
    assert "nowhere: data.unlabelled source not found" in check_data(cfg, show_progress=False).problems[0]


def test_unlabelled_sources(tmp_path, synthetic_dir):
    frames = _write_images(tmp_path / "frames", 3)
    _write_images(tmp_path / "deep" / "a", 2, seed=1)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image"], ["frames/img0.png"], ["frames/img2.png"]])

    def images(*specs, **data):
        return unlabelled_images(config_from_dict({"data": {"root": str(tmp_path), "unlabelled": list(specs),
                                                            **data}}).data)

    assert images("frames") == frames
    assert [p.name for p in images("deep/**/*.png")] == ["img0.png", "img1.png"]
    assert images("list.csv") == [frames[0], frames[2]]
    with pytest.warns(UserWarning, match=r"data.unlabelled: 2 image\(s\) listed by more than one source"):
        assert images("frames", "list.csv") == frames
    with pytest.warns(UserWarning, match=r"22 image\(s\) listed by more than one source"):
        train = unlabelled_images(config_from_dict({"data": {"root": str(synthetic_dir), "train": ".",
                                                             "unlabelled": ["train", "."]}}).data)
    assert len(train) == 24, "'train' (the split after the hold-out) and the split's images/ folder, each once"
    with pytest.raises(DataError, match=r"nowhere: data.unlabelled source not found"):
        images("nowhere")
    with pytest.raises(DataError, match=r"matches no image file"):
        images("frames/*.jpg")
    with open(tmp_path / "missing.csv", "w") as f:
        f.write("frames/img0.png\nframes/gone.png\n")
    with pytest.raises(DataError, match=r"gone\.png: listed in .*missing\.csv but not found"):
        images("missing.csv")


def test_ssl_config():
    cfg = config_from_dict({})
    s = cfg.loss.ssl
    assert (s.weight, s.temperature, s.mlp_dim, s.emb_dim, s.batch_size) == (0.0, 0.1, 4096, 256, 8)
    assert cfg.data.unlabelled == [] and cfg.loss.clip.weight == 0.0 and cfg.model.class_head == "linear"
    with pytest.raises(ConfigError, match=r"loss.ssl.weight: 1.0 needs unlabelled images in data.unlabelled"):
        config_from_dict({}, ["loss.ssl.weight=1"])
    with pytest.raises(ConfigError, match=r"loss.ssl.weight: 1.0 trains the image encoder, but "
                                          r"peft.method=decoder_only leaves it frozen"):
        config_from_dict({}, ["loss.ssl.weight=1", "data.unlabelled=[frames]", "peft.method=decoder_only"])
    with pytest.raises(ConfigError, match=r"loss.ssl.batch_size: 1 is below the minimum 2"):
        config_from_dict({}, ["loss.ssl.batch_size=1"])
    with pytest.raises(ConfigError, match=r"loss.ssl.temperature: 0.0 is below the minimum"):
        config_from_dict({}, ["loss.ssl.temperature=0"])
    from samft.config import unused_option_warnings

    assert unused_option_warnings(config_from_dict({}, ["data.unlabelled=[frames]"])) == [
        "data.unlabelled lists 1 source(s) but loss.ssl.weight is 0: the unlabelled images are not used"]
    assert unused_option_warnings(config_from_dict({}, ["data.unlabelled=[frames]", "loss.ssl.weight=0.5"])) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict({}, ["data.unlabelled=[a, b]", "loss.ssl.weight=0.5"])


def test_ssl_head_factory_is_off_at_weight_zero_and_leaves_the_global_rng_alone():
    from samft.slip.ssl import build_ssl_head

    off = tiny_config("lora")
    on = tiny_config("lora", data={"unlabelled": ["train"]}, loss={"ssl": {"weight": 0.5, "mlp_dim": 24,
                                                                           "emb_dim": 8}})
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert build_ssl_head(off, 32) is None
    head = build_ssl_head(on, 32)
    assert torch.equal(torch.get_rng_state(), state), "building the head draws nothing from the global RNG"
    assert head.mlp.layer1.in_features == 32 and head.mlp.layer3.out_features == 8
    assert isinstance(head.mlp.bn1, nn.BatchNorm1d) and not isinstance(head.mlp.bn1, DistBatchNorm1d)
    again = convert_sync_batchnorm(build_ssl_head(on, 32))  # as the training set-up does under torchrun
    assert isinstance(again.mlp.bn1, DistBatchNorm1d)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values())), \
        "the head's initialisation depends on train.seed only"
