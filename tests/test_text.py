"""SLIP's language branch: class-name embeddings (file or open_clip), the text class head and the
region-text loss, each against its formula written out here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from samft.config import config_from_dict
from samft.errors import CheckpointError, ConfigError, DataError
from samft.model import build_model
from samft.slip.text import (LOGIT_SCALE_INIT, RegionTextHead, TextClassHead, class_embeddings, load_class_embeddings,
                        region_features, region_text_loss, use_text_class_head)

from conftest import tiny_config

CLASSES = ["background", "cat", "dog"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(a @ b / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------
# Region-text loss and text head
# ---------------------------------------------------------------------------------------------


def brute_region_text_loss(features, gt, ignore, proj, text, logit_scale) -> float:
    """Per image and class present: the features averaged over the class's pixels (each feature cell
    counted once per pixel of it in the region), projected; cross-entropy of s * cos against every class."""
    b, c, h, w = features.shape
    H, W = gt.shape[1:]
    s = math.exp(min(float(logit_scale), math.log(100)))
    losses = []
    for i in range(b):
        for k in range(text.shape[0]):
            ys, xs = np.nonzero((gt[i] == k).numpy())
            if len(ys) == 0:
                continue
            cells = features[i, :, ys // (H // h), xs // (W // w)]  # (C, pixels)
            z = proj(cells.mean(dim=1))
            logits = [s * _cos(z, text[j]) for j in range(text.shape[0])]
            losses.append(-logits[k] + math.log(sum(math.exp(v) for v in logits)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("logit_scale", [LOGIT_SCALE_INIT, 6.0])  # 6 > ln 100: clamped
def test_region_text_loss_equals_its_formula(logit_scale):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 4, 4, generator=g)
    gt = torch.randint(0, 3, (2, 16, 16), generator=g)
    gt[0, :5] = 255  # ignored pixels belong to no region
    gt[1][gt[1] == 2] = 0  # class 2 absent from image 1
    proj = torch.nn.Linear(8, 5, bias=False)
    text = torch.randn(3, 5, generator=g)
    got = region_text_loss(features, gt, 255, proj, text, torch.tensor(logit_scale))
    want = brute_region_text_loss(features, gt, 255, proj, text, logit_scale)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    regions, labels = region_features(features, gt, 255, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1]
    ys, xs = np.nonzero((gt[1] == 1).numpy())  # image 1, class 1: the mean over its pixels' cells
    torch.testing.assert_close(regions[4], features[1, :, ys // 4, xs // 4].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_region_text_loss_trains_projection_scale_and_features():
    features = torch.randn(1, 8, 2, 2, requires_grad=True)
    head = RegionTextHead(8, torch.randn(3, 5))
    loss = head(features, torch.randint(0, 3, (1, 8, 8)), 255)
    loss.backward()
    assert features.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0
    assert head.logit_scale.grad is not None and head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    nothing = head(features, torch.full((1, 8, 8), 255), 255)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_text_class_head_scores_are_scaled_cosines_with_no_object_last():
    torch.manual_seed(0)
    text = torch.randn(3, 5)
    head = TextClassHead(8, text)
    tokens = torch.randn(2, 4, 8)
    scores = head(tokens).detach()
    assert scores.shape == (2, 4, 4)
    z = head.proj(tokens[1, 2])
    bank = [*text, head.no_object]
    for j, e in enumerate(bank):
        assert float(scores[1, 2, j]) == pytest.approx((1 / 0.07) * _cos(z, e), rel=1e-5)
    with torch.no_grad():
        head.logit_scale.fill_(7.0)  # beyond ln(100): clamped
    assert head(tokens)[1, 2, 0].item() == pytest.approx(100 * _cos(z, text[0]), rel=1e-5)


def test_text_class_head_replaces_the_linear_head():
    cfg = tiny_config("lora", data={"classes": CLASSES}, model={"num_mask_tokens": 4})
    model = build_model(cfg).model
    head = use_text_class_head(model.decoder, torch.randn(3, 7))
    assert model.decoder.class_head is head and "decoder.class_head.text_emb" in model.state_dict()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.class_logits.shape == (2, 4, 4)
    out.class_logits.sum().backward()
    assert head.proj.weight.grad is not None and head.no_object.grad is not None
    with pytest.raises(ConfigError, match="5 class-name embeddings for a decoder with 3 classes"):
        use_text_class_head(build_model(cfg).model.decoder, torch.randn(5, 7))


# ---------------------------------------------------------------------------------------------
# Embeddings from a file
# ---------------------------------------------------------------------------------------------


def test_embeddings_file_safetensors_and_npy(tmp_path):
    emb = torch.randn(3, 6)
    save_file({"classes": emb}, str(tmp_path / "e.safetensors"))
    np.save(tmp_path / "e.npy", emb.double().numpy())
    for name in ("e.safetensors", "e.npy"):
        got = load_class_embeddings(tmp_path / name, 3)
        assert got.dtype == torch.float32 and torch.allclose(got, emb)
    cfg = config_from_dict({}, ["data.classes=[background, cat, dog]", f"model.text.embeddings={tmp_path / 'e.npy'}",
                                "model.class_head=text"])
    assert torch.allclose(class_embeddings(cfg.model.text, cfg.data.classes), emb)


def test_bad_embeddings_files_are_named(tmp_path):
    np.save(tmp_path / "four.npy", np.random.rand(4, 6).astype(np.float32))
    with pytest.raises(DataError, match=r"four\.npy: 4 rows of class-name embeddings for 3 classes"):
        load_class_embeddings(tmp_path / "four.npy", 3)
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(DataError, match=r"junk\.safetensors: cannot read class-name embeddings"):
        load_class_embeddings(tmp_path / "junk.safetensors", 3)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"junk\.npy: cannot read class-name embeddings"):
        load_class_embeddings(tmp_path / "junk.npy", 3)
    save_file({"a": torch.randn(3, 6), "b": torch.randn(3, 6)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(DataError, match=r"two\.safetensors: expected one tensor .* found 2"):
        load_class_embeddings(tmp_path / "two.safetensors", 3)
    np.save(tmp_path / "flat.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(DataError, match=r"flat\.npy: expected a 2-D float array"):
        load_class_embeddings(tmp_path / "flat.npy", 3)
    np.save(tmp_path / "nan.npy", np.full((3, 2), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match=r"nan\.npy: .*NaN"):
        load_class_embeddings(tmp_path / "nan.npy", 3)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(DataError, match=r"objects\.npy: cannot read"):  # never unpickled
        load_class_embeddings(tmp_path / "objects.npy", 3)
    with pytest.raises(DataError, match=r"absent\.npy: class-name embeddings file not found"):
        load_class_embeddings(tmp_path / "absent.npy", 3)
    (tmp_path / "e.txt").write_text("1 2 3")
    with pytest.raises(DataError, match=r"e\.txt: class-name embeddings must be a \.safetensors or \.npy file"):
        load_class_embeddings(tmp_path / "e.txt", 3)


def test_text_config_rules():
    base = ["data.classes=[background, cat, dog]"]
    with pytest.raises(ConfigError, match=r"model.class_head=text: needs class-name embeddings"):
        config_from_dict({}, [*base, "model.class_head=text"])
    with pytest.raises(ConfigError, match=r"loss.clip.weight=0.5: needs class names in data.classes"):
        config_from_dict({}, ["loss.clip.weight=0.5", "model.text.embeddings=e.npy"])
    with pytest.raises(ConfigError, match=r"set either embeddings .* or open_clip_model"):
        config_from_dict({}, [*base, "model.text.embeddings=e.npy", "model.text.open_clip_model=ViT-B-16",
                              "model.text.checkpoint=w.pt"])
    with pytest.raises(ConfigError, match=r"model.text.checkpoint: open_clip_model 'ViT-B-16' needs a local"):
        config_from_dict({}, [*base, "model.text.open_clip_model=ViT-B-16"])
    with pytest.raises(ConfigError, match=r"model.text.templates: 'a photo' must contain exactly one \{\}"):
        config_from_dict({}, ["model.text.templates=['a photo']"])
    with pytest.raises(ConfigError, match=r"model.class_head: 'txt' is not one of linear, text"):
        config_from_dict({}, ["model.class_head=txt"])
    cfg = config_from_dict({})
    assert cfg.model.text.templates[0] == "itap of a {}." and len(cfg.model.text.templates) == 7


# ---------------------------------------------------------------------------------------------
# open_clip (optional extra)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny random open_clip model registered under a test name, and its weights as safetensors."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch (samft[text]) is not installed")
    folder = tmp_path_factory.mktemp("open_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "samft-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "samft-test-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("samft-test-tiny", pretrained=None, load_weights=False, pretrained_text=False)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    return model.eval(), open_clip.get_tokenizer("samft-test-tiny"), folder


def test_open_clip_embeddings_average_normalised_prompts(tiny_open_clip):
    model, tokenizer, folder = tiny_open_clip
    templates = ["a photo of a {}.", "a {} in the wild."]
    cfg = config_from_dict({}, ["data.classes=[background, cat, dog]", "model.class_head=text",
                                "model.text.open_clip_model=samft-test-tiny",
                                f"model.text.checkpoint={folder / 'tiny.safetensors'}",
                                f"model.text.templates={json.dumps(templates)}"])
    torch.manual_seed(123)  # the model built from the checkpoint must not depend on the random init
    got = class_embeddings(cfg.model.text, cfg.data.classes)
    assert got.shape == (3, 16)
    with torch.no_grad():
        for k, name in enumerate(CLASSES):
            prompts = [model.encode_text(tokenizer([t.format(name)]))[0] for t in templates]
            mean = sum(p / p.norm() for p in prompts) / len(prompts)
            torch.testing.assert_close(got[k], mean / mean.norm(), rtol=1e-5, atol=1e-6)


def test_open_clip_missing_or_wrong_weights_are_named(tiny_open_clip, tmp_path):
    _, _, folder = tiny_open_clip
    text = config_from_dict({}, ["model.text.open_clip_model=samft-test-tiny",
                                 f"model.text.checkpoint={tmp_path / 'missing.pt'}"]).model.text
    with pytest.raises(CheckpointError, match=r"missing\.pt: open_clip checkpoint not found .* downloads nothing"):
        class_embeddings(text, CLASSES)
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    text.checkpoint = str(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other\.safetensors: not a checkpoint of open_clip model"):
        class_embeddings(text, CLASSES)
    text.open_clip_model = "no-such-model"
    with pytest.raises(ConfigError, match=r"'no-such-model' is not an open_clip model config"):
        class_embeddings(text, CLASSES)


def test_text_heads_factory(tmp_path):
    from samft.slip.text import build_text_heads

    np.save(tmp_path / "names.npy", np.random.rand(3, 7).astype(np.float32))
    plain = tiny_config("lora", data={"classes": CLASSES})
    model = build_model(plain).model
    linear = model.decoder.class_head
    assert build_text_heads(plain, model) == (None, None) and model.decoder.class_head is linear
    cfg = tiny_config("lora", data={"classes": CLASSES},
                      model={"class_head": "text", "text": {"embeddings": str(tmp_path / "names.npy")}},
                      loss={"clip": {"weight": 0.5}})
    model = build_model(cfg).model
    state = torch.get_rng_state()
    head, region = build_text_heads(cfg, model)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.decoder.class_head is head and head.num_classes == 3
    assert region.proj.in_features == 32 and region.proj.out_features == 7
    assert not any(n.startswith("region") for n, _ in model.named_parameters()), "the region head is not the model's"


def test_a_run_with_open_clip_class_names_needs_the_text_tower_only_to_train(tiny_open_clip, tmp_path):
    """model.class_head=text from a local open_clip tower: trained, then used after the tower is gone."""
    from samft.engine.infer.segmenter import Segmenter
    from samft.engine.train.loop import train
    from samft.model import describe
    from samft.slip.text import TEXT_EMB_KEY

    from conftest import classes_dir

    _, _, folder = tiny_open_clip
    checkpoint = tmp_path / "clip" / "tiny.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes((folder / "tiny.safetensors").read_bytes())
    cfg = tiny_config("lora", model={"num_mask_tokens": 4, "class_head": "text",
                                     "text": {"open_clip_model": "samft-test-tiny", "checkpoint": str(checkpoint)}},
                      data={"root": str(classes_dir(tmp_path / "data")), "train": ".", "classes": CLASSES,
                            "val_fraction": 0.25},
                      train={"epochs": 1, "batch_size": 3, "progress": False, "device": "cpu"},
                      output={"dir": str(tmp_path / "run")})
    assert describe(cfg)["class_head"] == "text (3 classes x 16-d class-name embeddings)"  # no weights read
    want = class_embeddings(cfg.model.text, cfg.data.classes)
    run = train(cfg, show_progress=False)
    checkpoint.unlink()
    segmenter = Segmenter.from_run(run, device="cpu")
    torch.testing.assert_close(segmenter.model.decoder.class_head.text_emb, want)
    assert TEXT_EMB_KEY in segmenter.model.state_dict()
    scores = segmenter.predict_scores(np.zeros((40, 50, 3), np.uint8))
    assert scores.shape == (3, 40, 50)


def test_logit_scales_are_clamped_after_the_step_as_slip_does():
    """The parameter itself is held in [0, ln 100] after each optimizer step (SLIP's training loop), so the
    forward's clamp never cuts the gradient."""
    import math

    import torch

    from samft.slip.text import RegionTextHead, TextClassHead, clamp_logit_scales

    heads = torch.nn.ModuleDict({"a": TextClassHead(8, torch.randn(3, 4)), "b": RegionTextHead(8, torch.randn(3, 4))})
    with torch.no_grad():
        heads["a"].logit_scale.fill_(7.0)
        heads["b"].logit_scale.fill_(-1.0)
        heads["a"].proj.weight.fill_(9.0)
    clamp_logit_scales(heads)
    assert float(heads["a"].logit_scale) == pytest.approx(math.log(100.0))
    assert float(heads["b"].logit_scale) == 0.0
    assert float(heads["a"].proj.weight.max()) == 9.0  # nothing else touched
