"""Model construction: SAM + SemanticSAM head + the configured PEFT method."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from samft import peft
from samft.config import Config
from samft.model.attention import EncoderAttention, attention_kinds, set_attention
from samft.model.flops import encoder_flops
from samft.model.sam import base_fingerprint, build_sam
from samft.model.semantic import SegOutput, SemanticSAM
from samft.tasks import make_task


@dataclass
class BuiltModel:
    model: SemanticSAM
    adapted: list[str] = field(default_factory=list)  # module names the PEFT method adapted
    base_sha256: str = ""  # identity of the frozen base weights


def build_model(cfg: Config, meta: bool = False) -> BuiltModel:
    """Build SAM, wrap it as SemanticSAM, freeze the base and apply ``cfg.peft.method``.

    Afterwards exactly the PEFT parameters and the mask decoder require grad. ``meta=True`` builds the
    structure only (no weights, no checkpoint read), for counting parameters. The encoder's attention
    implementation (``cfg.model.attention``) is set before the PEFT method is applied, so methods that
    wrap ``blk.attn`` or ``attn.qkv`` see SAM's attribute names.
    """
    sam = build_sam(cfg.model, meta=meta)
    sha = "" if meta else base_fingerprint(cfg.model, sam)
    spec = peft.get(cfg.peft.method)
    task = make_task(cfg)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = SemanticSAM(sam, num_queries=task.num_queries, num_classes=task.num_classes)
        model.freeze_base()
        used = set_attention(model.image_encoder, cfg.model.attention, getattr(cfg.model, cfg.model.attention, None))
        adapted = spec.apply(model.image_encoder, cfg.method_cfg)
    if not used:
        warnings.warn(f"model.attention={cfg.model.attention} applies to no encoder block (each uses sdpa)",
                      stacklevel=2)
    model.refresh_aux_modules()
    return BuiltModel(model, adapted, sha)


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


def describe(cfg: Config) -> dict:
    """What ``samft info`` reports: model, attention, PEFT method and options, adapted modules, parameter
    counts and the encoder's forward GMACs per image at ``img_size`` (``samft/model/flops.py``).

    Builds the structure only (``meta=True``): no weights are read, so this is instant for any size.
    """
    built = build_model(cfg, meta=True)
    counts = count_params(built.model)
    options = getattr(cfg.model, cfg.model.attention, None)
    kinds = attention_kinds(built.model.image_encoder)
    return {
        "model": cfg.model.type,
        "img_size": cfg.model.img_size,
        "checkpoint": cfg.model.checkpoint,
        "attention": cfg.model.attention,
        "attention_options": dict(vars(options)) if options is not None else {},
        "attention_blocks": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
        "attention_params": attention_params(built.model.image_encoder),
        "encoder_gmacs": round(encoder_flops(built.model.image_encoder, cfg.model.img_size)["total"] / 2e9, 3),
        "peft_method": cfg.peft.method,
        "peft_options": dict(vars(cfg.method_cfg)),
        "mergeable": peft.get(cfg.peft.method).mergeable,
        "adapted_modules": built.adapted,
        **counts,
        "trainable_percent": round(100.0 * counts["trainable_params"] / counts["total_params"], 4),
    }


__all__ = ["BuiltModel", "SegOutput", "SemanticSAM", "build_model", "count_params", "describe"]
