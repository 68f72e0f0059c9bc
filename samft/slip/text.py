"""Class names as targets: SLIP's language branch adapted to segmentation.

Class-name embeddings (K, D), one row per class of ``data.classes`` (background included), come from

- a file (``model.text.embeddings``): a ``.safetensors`` file with one tensor, or a ``.npy`` array; or
- an open_clip text tower (``model.text.open_clip_model`` + a local ``model.text.checkpoint``; the
  optional extra ``samft[text]``): each class name is put into every prompt template, embedded and
  L2-normalised; the class's embedding is the normalised mean, as SLIP's zero-shot evaluation does.
  Nothing is downloaded.

They are used by

- :class:`TextClassHead`, which replaces the Linear class head of the mask decoder: cosine similarity
  between a learned projection of each mask token and the class embeddings plus a learned "no object"
  embedding, times a learned logit scale (CLIP's: initialised to ln(1/0.07), clamped at ln(100));
- :func:`region_text_loss`: neck features averaged over each ground-truth class region of an image,
  projected, and classified against the class embeddings with a cross-entropy (image-to-text only: a
  class name is the target of many regions, so the text-to-image direction has no single positive).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samft.errors import CheckpointError, ConfigError, DataError, load_failure, pickle_refused

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial inverse temperature (log)
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp


# ---------------------------------------------------------------------------------------------
# Class-name embeddings
# ---------------------------------------------------------------------------------------------


def load_class_embeddings(path: str | Path, num_classes: int) -> torch.Tensor:
    """A (num_classes, D) float32 tensor from a .safetensors (one tensor) or .npy file; errors name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: class-name embeddings file not found (model.text.embeddings)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise DataError(f"{path}: expected one tensor of class-name embeddings, found {len(tensors)} "
                                f"({', '.join(sorted(tensors)[:5])})")
            emb = next(iter(tensors.values()))
        elif suffix == ".npy":
            emb = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            raise DataError(f"{path}: class-name embeddings must be a .safetensors or .npy file")
    except DataError:
        raise
    except Exception as e:  # a truncated or foreign file: safetensors and numpy raise various types
        raise DataError(f"{path}: cannot read class-name embeddings ({type(e).__name__}: {e})") from None
    return _checked(emb, num_classes, str(path))


def _checked(emb: torch.Tensor, num_classes: int, where: str) -> torch.Tensor:
    if emb.dim() != 2 or not (emb.is_floating_point()):
        raise DataError(f"{where}: expected a 2-D float array (classes x dims), got {tuple(emb.shape)} {emb.dtype}")
    if emb.shape[0] != num_classes:
        raise DataError(f"{where}: {emb.shape[0]} rows of class-name embeddings for {num_classes} classes in "
                        f"data.classes (one row per class, in that order)")
    emb = emb.float()
    if not torch.isfinite(emb).all():
        raise DataError(f"{where}: class-name embeddings contain NaN or infinite values")
    if (emb.norm(dim=-1) == 0).any():
        row = int((emb.norm(dim=-1) == 0).nonzero()[0])
        raise DataError(f"{where}: row {row} of the class-name embeddings is all zeros")
    return emb.contiguous()


@contextlib.contextmanager
def _offline():
    """Keep Hugging Face hub look-ups (open_clip HF text towers and tokenizers) from reaching the network."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs 'initialized randomly' on the root logger; the weights are loaded right after."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _open_clip():
    """The optional ``open_clip`` package (a ConfigError naming the extra when it is not installed)."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError("model.text.open_clip_model needs the optional extra: pip install 'samft[text]' "
                          "(open_clip_torch)") from None
    return open_clip


def _open_clip_config(open_clip, model_name: str) -> dict:
    """open_clip's config of ``model_name`` (a ConfigError when it has none)."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ConfigError(f"model.text.open_clip_model: {model_name!r} is not an open_clip model config "
                          f"(open_clip.list_models() lists them)")
    return config


def build_open_clip(model_name: str, checkpoint: str | Path) -> tuple[nn.Module, object]:
    """An open_clip model with the weights of the local ``checkpoint`` (strict), and its tokenizer."""
    open_clip = _open_clip()
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: open_clip checkpoint not found (model.text.checkpoint); samft "
                              f"downloads nothing")
    _open_clip_config(open_clip, model_name)
    with _offline(), _quiet_root_logger():
        try:
            model = open_clip.create_model(model_name, pretrained=None, load_weights=False, pretrained_text=False,
                                           pretrained_image=False)
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as e:  # an HF text tower or tokenizer that is not cached locally
            raise ConfigError(f"model.text.open_clip_model: cannot build {model_name!r} offline "
                              f"({type(e).__name__}: {e})") from None
    try:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    except Exception as e:
        why = load_failure(e) if pickle_refused(e) else f"{type(e).__name__}: {str(e)[:300]}"
        raise CheckpointError(f"{checkpoint}: not a checkpoint of open_clip model {model_name!r} ({why})") from None
    return model.eval(), tokenizer


@torch.no_grad()
def encode_class_names(model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """(K, D): per class, the L2-normalised mean of the L2-normalised text embeddings of its prompts."""
    model = model.to(device)
    rows = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows).cpu()


def class_embeddings(text_cfg, class_names: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """(K, D) embeddings of ``class_names`` from ``model.text`` (a TextConfig): its file, or open_clip."""
    if text_cfg.embeddings:
        return load_class_embeddings(text_cfg.embeddings, len(class_names))
    if text_cfg.open_clip_model:
        model, tokenizer = build_open_clip(text_cfg.open_clip_model, text_cfg.checkpoint)
        emb = encode_class_names(model, tokenizer, class_names, text_cfg.templates, device)
        return _checked(emb, len(class_names), f"open_clip {text_cfg.open_clip_model}")
    raise ConfigError("model.text: no class-name embeddings configured (set embeddings, or open_clip_model and "
                      "checkpoint)")


def embedding_dim(text_cfg, num_classes: int) -> int:
    """The width D of ``model.text``'s class-name embeddings without encoding anything: the file's second
    dimension (read and checked), or the open_clip model config's ``embed_dim`` (no weights are read)."""
    if text_cfg.embeddings:
        return int(load_class_embeddings(text_cfg.embeddings, num_classes).shape[1])
    if text_cfg.open_clip_model:
        return int(_open_clip_config(_open_clip(), text_cfg.open_clip_model)["embed_dim"])
    raise ConfigError("model.text: no class-name embeddings configured (set embeddings, or open_clip_model and "
                      "checkpoint)")


# ---------------------------------------------------------------------------------------------
# Heads and the region-text loss
# ---------------------------------------------------------------------------------------------


def clamp_logit_scales(module: nn.Module) -> None:
    """SLIP's (and CLIP's) rule, after each optimizer step: every ``logit_scale`` parameter of ``module`` held in
    [0, ln 100]. The forward's clamp then never cuts the gradient: the parameter is never above it."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale" or name.endswith(".logit_scale"):
                p.clamp_(0.0, LOGIT_SCALE_MAX)


def clamped_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) with logit_scale clamped at ln(100), as CLIP."""
    return logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


class TextClassHead(nn.Module):
    """Mask tokens (..., dim) -> class scores (..., K+1) by cosine similarity to class-name embeddings.

    Scores ``s * cos(W t, e_k)`` for the K class embeddings ``e_k`` (a frozen buffer) and a learned
    "no object" embedding (the last score, as the Linear head's), ``s = exp(min(logit_scale, ln 100))``.
    A drop-in replacement for ``SemanticMaskDecoder.class_head``. The class-name embeddings are part of
    the trained model: ``adapter_buffers`` names the buffer that adapter files and the resumable state keep
    with the trainable tensors, so a run is evaluated, exported and used without the embeddings' source.
    """

    adapter_buffers = ("text_emb",)

    def __init__(self, dim: int, text_emb: torch.Tensor) -> None:
        super().__init__()
        k, d = text_emb.shape
        self.proj = nn.Linear(dim, d, bias=False)
        self.register_buffer("text_emb", F.normalize(text_emb.detach().float(), dim=-1).clone())
        self.no_object = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @property
    def num_classes(self) -> int:
        return self.text_emb.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.proj(tokens).float(), dim=-1)
        bank = torch.cat([self.text_emb, F.normalize(self.no_object.float(), dim=-1)[None]], dim=0)
        return clamped_scale(self.logit_scale) * z @ bank.t()


def region_features(features: torch.Tensor, gt: torch.Tensor, ignore_index: int, num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling of features (B, C, h, w) over each class region of gt (B, H, W) class ids.

    H, W are multiples of h, w (the input and the neck grid). Each feature cell is weighted by the
    fraction of its H/h x W/w pixels that belong to the class (ignore_index pixels belong to none).
    Returns (R, C) region features and their (R,) class ids, one row per (image, class present).
    """
    b, c, h, w = features.shape
    H, W = gt.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"ground truth {H}x{W} is not a multiple of the feature grid {h}x{w}")
    sy, sx = H // h, W // w
    gt = gt.long()
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    rows = torch.arange(H, device=gt.device)[:, None] // sy
    cols = torch.arange(W, device=gt.device)[None, :] // sx
    cell = (rows * w + cols).expand(b, H, W)
    image = torch.arange(b, device=gt.device)[:, None, None].expand(b, H, W)
    flat = ((image * num_classes + gt.clamp(0, num_classes - 1)) * (h * w) + cell)[valid]
    counts = torch.bincount(flat, minlength=b * num_classes * h * w).reshape(b, num_classes, h * w)
    weights = counts.to(features.dtype) / float(sy * sx)  # (B, K, h*w) fraction of each cell
    mass = weights.sum(-1)  # (B, K)
    pooled = torch.einsum("bkn,bcn->bkc", weights, features.reshape(b, c, h * w))
    present = mass > 0
    labels = torch.arange(num_classes, device=gt.device).expand(b, num_classes)[present]
    return pooled[present] / mass[present][:, None], labels


def region_text_loss(features: torch.Tensor, gt: torch.Tensor, ignore_index: int, proj: nn.Module,
                     text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Image-to-text cross-entropy of ground-truth class regions against the class-name bank -> scalar.

    features (B, C, h, w) neck features, gt (B, H, W) class ids; ``proj`` maps C to the text width D;
    text_emb (K, D). Logits ``exp(min(logit_scale, ln 100)) * cos(proj(region), e_k)``; the mean over all
    regions of the batch. Zero (with a graph through the features, ``proj`` and ``logit_scale``) when no pixel
    is labelled.
    """
    regions, labels = region_features(features.float(), gt, ignore_index, text_emb.shape[0])
    if regions.shape[0] == 0:  # a zero tied to every input, so each still gets a (zero) gradient: under DDP
        # without find_unused_parameters every parameter must get one on every process
        return (features.float().sum() + logit_scale + sum(p.sum() for p in proj.parameters())) * 0.0
    z = F.normalize(proj(regions).float(), dim=-1)
    bank = F.normalize(text_emb.float(), dim=-1)
    logits = clamped_scale(logit_scale) * z @ bank.t()
    return F.cross_entropy(logits, labels)


class RegionTextHead(nn.Module):
    """The region-text loss's trainable parts: projection (C -> D) and logit scale; thrown away after training."""

    def __init__(self, dim: int, text_emb: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, text_emb.shape[1], bias=False)
        self.register_buffer("text_emb", F.normalize(text_emb.detach().float(), dim=-1).clone())
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def forward(self, features: torch.Tensor, gt: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return region_text_loss(features, gt, ignore_index, self.proj, self.text_emb, self.logit_scale)


def use_text_class_head(decoder: nn.Module, text_emb: torch.Tensor) -> Optional[TextClassHead]:
    """Put a :class:`TextClassHead` in place of a multi-class decoder's Linear ``class_head``; returns it."""
    old = getattr(decoder, "class_head", None)
    if old is None:
        return None
    if old.out_features != text_emb.shape[0] + 1:
        raise ConfigError(f"model.text: {text_emb.shape[0]} class-name embeddings for a decoder with "
                          f"{old.out_features - 1} classes")
    head = TextClassHead(old.in_features, text_emb).to(old.weight.device)
    decoder.class_head = head
    return head


HEAD_SEED_SALT = 0x7E47  # the text heads' own seed: train.seed + this
TEXT_EMB_KEY = "decoder.class_head.text_emb"  # the class-name embeddings in a SemanticSAM's state


def stored_text_embeddings(cfg, tensors: dict[str, torch.Tensor], source: str) -> Optional[torch.Tensor]:
    """The class-name embeddings a saved model (adapter, export) holds, when ``cfg`` has the text class head;
    a CheckpointError naming ``source`` when it should hold them and does not."""
    if cfg.model.class_head != "text":
        return None
    emb = tensors.get(TEXT_EMB_KEY)
    if emb is None:
        raise CheckpointError(f"{source}: its config has model.class_head=text but it holds no class-name "
                              f"embeddings ({TEXT_EMB_KEY})")
    if emb.dim() != 2 or emb.shape[0] != len(cfg.data.classes) or emb.shape[1] == 0 or not emb.is_floating_point():
        raise CheckpointError(f"{source}: {TEXT_EMB_KEY} has shape {tuple(emb.shape)}, expected "
                              f"({len(cfg.data.classes)}, D) floats for data.classes")
    return emb


def attach_text_class_head(cfg, decoder: nn.Module, text_emb: Optional[torch.Tensor] = None
                           ) -> Optional[TextClassHead]:
    """``model.class_head=text``: a :class:`TextClassHead` in place of ``decoder``'s Linear class head.

    ``text_emb`` (K, D): the class-name embeddings (those an adapter or export holds); None reads them from
    ``model.text``, or, on the meta device, only their width. Initialised from its own seed (``train.seed`` +
    a salt) without touching the global RNG. None when ``cfg`` keeps the Linear head or the task has none.
    """
    if cfg.model.class_head != "text" or getattr(decoder, "class_head", None) is None:
        return None
    if text_emb is None:
        k = len(cfg.data.classes)
        if decoder.class_head.weight.device.type == "meta":
            text_emb = torch.empty(k, embedding_dim(cfg.model.text, k), device="meta")
        else:
            text_emb = class_embeddings(cfg.model.text, cfg.data.classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + HEAD_SEED_SALT)
        return use_text_class_head(decoder, text_emb)


def build_text_heads(cfg, model: nn.Module, device: str | torch.device = "cpu"
                     ) -> tuple[Optional[TextClassHead], Optional[RegionTextHead]]:
    """What ``cfg`` asks of the language branch, for a built ``SemanticSAM``:

    - ``model.class_head=text``: the model's :class:`TextClassHead` (``build_model`` put it in place of the
      Linear head: it trains and is saved with the adapter, its ``text_emb`` buffer too);
    - ``loss.clip.weight > 0``: a :class:`RegionTextHead` for the neck features (training only), on the
      class head's embeddings when there is one, else those of ``model.text`` (read once).

    Nothing is built or loaded when neither is asked. The region head is initialised from its own seed
    without touching the global RNG.
    """
    head = model.decoder.class_head if isinstance(model.decoder.class_head, TextClassHead) else None
    if cfg.loss.clip.weight <= 0:
        return head, None
    emb = head.text_emb if head is not None else class_embeddings(cfg.model.text, cfg.data.classes, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + HEAD_SEED_SALT + 1)
        region = RegionTextHead(model.feature_channels, emb.detach().cpu())
    return head, region.to(next(model.decoder.parameters()).device)
