"""Model construction: SAM + SemanticSAM head + the configured PEFT method."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import samft.peft as peft
from samft.config import Config
from samft.model.attention import EncoderAttention, attention_kinds, set_attention
from samft.model.sam import base_fingerprint, build_sam
from samft.peft.decoder import place_decoder
from samft.peft.placement import apply_placed
from samft.peft.quantize import quantize_encoder
from samft.model.semantic import SegOutput, SemanticSAM
from samft.prune.encoder_flops import encoder_flops
from samft.prune.state import apply_pruned, describe_pruned
from samft.slip.text import attach_text_class_head
from samft.tasks.task import make_task


@dataclass
class BuiltModel:
    model: SemanticSAM
    adapted: list[str] = field(default_factory=list)  # module names the PEFT method adapted
    base_sha256: str = ""  # identity of the frozen base weights
    placement: str = "all"  # the encoder blocks that carry the method (peft.blocks, resolved: "all", "8-11 of 12")


def build_base(cfg: Config, meta: bool = False):
    """The base model of ``cfg.model.family``: SAM 1 (``segment_anything``'s ``Sam``) or SAM 2.1's parts."""
    if cfg.model.family == "sam2":
        from samft.model.hiera import build_sam2

        return build_sam2(cfg.model, meta=meta)
    return build_sam(cfg.model, meta=meta)


def semantic_model(cfg: Config, base, num_queries: int, num_classes: int) -> SemanticSAM:
    """The family's semantic model around ``base`` (:class:`SemanticSAM` or :class:`SemanticSAM2`)."""
    if cfg.model.family == "sam2":
        from samft.model.semantic2 import SemanticSAM2

        return SemanticSAM2(base, num_queries, num_classes, img_size=cfg.model.img_size)
    return SemanticSAM(base, num_queries=num_queries, num_classes=num_classes)


def build_model(cfg: Config, meta: bool = False, text_emb: Optional[torch.Tensor] = None) -> BuiltModel:
    """Build SAM, wrap it as SemanticSAM, freeze the base and apply ``cfg.peft.method``.

    Afterwards exactly the PEFT parameters and the mask decoder require grad. ``meta=True`` builds the
    structure only (no weights, no checkpoint read), for counting parameters. The encoder's attention
    implementation (``cfg.model.attention``) is set before the PEFT method is applied, so methods that
    wrap ``blk.attn`` or ``attn.qkv`` see SAM's attribute names. With ``model.pruned`` (a file written by
    ``samft prune``) the encoder is then rebuilt to the pruned architecture and the file's whole state is
    loaded (:mod:`samft.prune.state`); ``base_sha256`` is then that file's. With ``model.class_head=text``
    (SLIP) the decoder classifies mask tokens against class-name embeddings: ``text_emb`` (K, D), those a
    saved adapter or export holds, else read from ``model.text`` (:func:`samft.slip.text.attach_text_class_head`).
    With ``model.quantize`` the encoder blocks' linears are quantised (bitsandbytes) before the method wraps them.
    """
    sam = build_base(cfg, meta)
    sha = "" if meta or cfg.model.pruned else base_fingerprint(cfg.model, sam)
    spec = peft.get(cfg.peft.method)
    task = make_task(cfg)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = semantic_model(cfg, sam, task.num_queries, task.num_classes)
        attach_text_class_head(cfg, model.decoder, text_emb)
        model.freeze_base()
        used = set_attention(model.image_encoder, cfg.model.attention, getattr(cfg.model, cfg.model.attention, None))
        if cfg.model.quantize != "none" and not meta:  # the meta structure (counting) keeps float32 linears
            quantize_encoder(model.image_encoder, cfg.model.quantize)
        adapted, placement = apply_placed(spec, model.image_encoder, cfg.method_cfg, cfg.peft.blocks, cfg.model.type)
        place_decoder(model.decoder, cfg.model.decoder, cfg.model.decoder_rank, cfg.model.decoder_alpha)
        if cfg.model.pruned:  # SPViT: the pruned architecture and its whole state replace the base
            sha = apply_pruned(model, cfg.model.pruned, meta=meta)
            kept = {n for n, _ in model.image_encoder.named_modules()}
            adapted = [n for n in adapted if n in kept]  # removed attentions took their adapters with them
    if not used:
        warnings.warn(f"model.attention={cfg.model.attention} applies to no encoder block (each uses sdpa)",
                      stacklevel=2)
    return BuiltModel(model, adapted, sha, placement=placement)


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "decoder_params": decoder,
            "adapter_params": trainable - decoder}


SAM_ATTENTION_PARAMS = ("qkv", "proj", "rel_pos_h", "rel_pos_w")


def attention_params(encoder) -> dict[str, int]:
    """Parameters the attention implementations add to SAM's (BRA's LEPE), by name below ``attn``, summed
    over blocks: {name: count}."""
    counts: dict[str, int] = {}
    for module in encoder.modules():
        if isinstance(module, EncoderAttention):
            for name, p in module.named_parameters():
                if name.split(".")[0] not in SAM_ATTENTION_PARAMS:
                    counts[name] = counts.get(name, 0) + p.numel()
    return counts


def _class_head(model: SemanticSAM) -> str:
    """How the decoder classifies mask tokens: none (one class), linear, or text (D-dim class-name embeddings)."""
    head = model.decoder.class_head
    if head is None:
        return "none (binary)"
    emb = getattr(head, "text_emb", None)
    return f"text ({emb.shape[0]} classes x {emb.shape[1]}-d class-name embeddings)" if emb is not None else \
        f"linear ({head.out_features - 1} classes + no object)"


def checkpoint_mismatch(model_type: str, checkpoint: Optional[str]) -> Optional[str]:
    """A note when the checkpoint's file name names another SAM size than ``model.type`` (``sam_vit_b_...`` for
    ``tiny``); None when they agree or nothing can be told from the name."""
    import re

    found = re.search(r"vit_([blh])", Path(checkpoint).name) if checkpoint else None
    if found and f"vit_{found.group(1)}" != model_type:
        return (f"model.type is {model_type} but the checkpoint's name says vit_{found.group(1)}: set model.type="
                f"vit_{found.group(1)}, or model.checkpoint=null to try the config with random weights")
    return None


def _structure(cfg: Config) -> BuiltModel:
    """The model's structure for counting: on the meta device for the official sizes (no memory, no weights
    read); a tiny size is built for real on the CPU with random weights and no checkpoint read, which is faster
    than the meta device, whose first decomposed op imports ``torch._dynamo`` (0.6 s of ``samft info``)."""
    if cfg.model.type != "tiny" or cfg.model.pruned:  # tiny is the one random-weight size of each family
        return build_model(cfg, meta=True)
    random_weights = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=None,
                                                                        quantize="none"))  # counts of the float structure
    return build_model(random_weights)


def encoder_gmacs(cfg: Config, encoder) -> float:
    """The encoder's forward GMACs per image at ``img_size``, counted for its family: SAM 1's ViT
    (``samft/prune/encoder_flops.py``) or SAM 2.1's Hiera + FPN neck (``samft/model/hiera_flops.py``)."""
    if cfg.model.family == "sam2":
        from samft.model.hiera_flops import hiera_flops

        return round(hiera_flops(encoder, cfg.model.img_size)["total"] / 2e9, 3)
    return round(encoder_flops(encoder, cfg.model.img_size)["total"] / 2e9, 3)


def describe(cfg: Config) -> dict:
    """What ``samft info`` reports: model, attention, PEFT method and options, adapted modules, parameter
    counts and the encoder's forward GMACs per image at ``img_size`` (``samft/prune/encoder_flops.py``).

    Builds the structure only (``meta=True``): no weights are read, so this is instant for any size.
    """
    built = _structure(cfg)
    counts = count_params(built.model)
    options = getattr(cfg.model, cfg.model.attention, None)
    kinds = attention_kinds(built.model.image_encoder)
    result = {
        "family": cfg.model.family,
        "model": cfg.model.type,
        "img_size": cfg.model.img_size,
        "checkpoint": cfg.model.checkpoint,
        "checkpoint_note": checkpoint_mismatch(cfg.model.type, cfg.model.checkpoint),
        "attention": cfg.model.attention,
        "attention_options": dict(vars(options)) if options is not None else {},
        "attention_blocks": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
        "attention_params": attention_params(built.model.image_encoder),
        "encoder_gmacs": None if cfg.model.pruned else encoder_gmacs(cfg, built.model.image_encoder),
        "peft_method": cfg.peft.method,
        "peft_options": dict(vars(cfg.method_cfg)),
        "peft_blocks": built.placement,
        "decoder": cfg.model.decoder,
        "mergeable": peft.get(cfg.peft.method).mergeable,
        "adapted_modules": built.adapted,
        "class_head": _class_head(built.model),
        **counts,
        "trainable_percent": round(100.0 * counts["trainable_params"] / counts["total_params"], 4),
    }
    if cfg.model.pruned:  # SPViT-pruned: the pruned encoder's GMACs, per block choice and units
        dense_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pruned=None))
        dense = build_model(dense_cfg, meta=True).model.image_encoder
        result.update(describe_pruned(cfg.model.pruned, cfg.model.img_size, built.model.image_encoder, dense))
    return result


__all__ = ["BuiltModel", "SegOutput", "SemanticSAM", "build_model", "count_params", "describe"]
