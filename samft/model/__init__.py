"""Model construction: SAM + SemanticSAM head + the configured PEFT method."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from samft import peft
from samft.config import Config
from samft.model.attention import set_attention
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
    wrap ``blk.attn`` or ``attn.qkv`` see SAM's attribute names. With ``model.pruned`` (a file written by
    ``samft prune``) the encoder is then rebuilt to the pruned architecture and the file's whole state is
    loaded (:mod:`samft.prune.state`); ``base_sha256`` is then that file's.
    """
    sam = build_sam(cfg.model, meta=meta)
    sha = "" if meta or cfg.model.pruned else base_fingerprint(cfg.model, sam)
    spec = peft.get(cfg.peft.method)
    task = make_task(cfg)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = SemanticSAM(sam, num_queries=task.num_queries, num_classes=task.num_classes)
        model.freeze_base()
        set_attention(model.image_encoder, cfg.model.attention)
        adapted = spec.apply(model.image_encoder, cfg.method_cfg)
        if cfg.model.pruned:  # SPViT: the pruned architecture and its whole state replace the base
            from samft.prune.state import apply_pruned

            sha = apply_pruned(model, cfg.model.pruned, meta=meta)
            kept = {n for n, _ in model.image_encoder.named_modules()}
            adapted = [n for n in adapted if n in kept]  # removed attentions took their adapters with them
    model.refresh_aux_modules()
    return BuiltModel(model, adapted, sha)


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "decoder_params": decoder,
            "adapter_params": trainable - decoder}


def describe(cfg: Config) -> dict:
    """What ``samft info`` reports: model, PEFT method and options, adapted modules, parameter counts.

    Builds the structure only (``meta=True``): no weights are read, so this is instant for any size.
    """
    built = build_model(cfg, meta=True)
    counts = count_params(built.model)
    result = {
        "model": cfg.model.type,
        "img_size": cfg.model.img_size,
        "checkpoint": cfg.model.checkpoint,
        "peft_method": cfg.peft.method,
        "peft_options": dict(vars(cfg.method_cfg)),
        "mergeable": peft.get(cfg.peft.method).mergeable,
        "adapted_modules": built.adapted,
        **counts,
        "trainable_percent": round(100.0 * counts["trainable_params"] / counts["total_params"], 4),
    }
    if cfg.model.pruned:  # SPViT-pruned: the pruned encoder's GMACs, per block choice and units
        from samft.prune.state import describe_pruned

        result.update(describe_pruned(cfg, built.model.image_encoder))
    return result


__all__ = ["BuiltModel", "SegOutput", "SemanticSAM", "build_model", "count_params", "describe"]
