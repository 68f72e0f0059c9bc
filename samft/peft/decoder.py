"""``model.decoder``: how the mask decoder trains, beside the encoder's PEFT method.

- ``full`` (the default): every weight of :class:`samft.model.semantic.SemanticMaskDecoder` trains.
- ``frozen``: SAM's decoder weights stay as they are; what samft adds trains: the class head (multi-class) and,
  with more than one query, the mask tokens (the Q queries start as copies of SAM's mask token and would stay
  equal, and so would their masks, if they could not move apart).
- ``peft``: ``frozen`` plus LoRA (:class:`samft.peft.lora.LoRALinear`, rank ``model.decoder_rank``, scale
  ``model.decoder_alpha / rank``) on the ``q_proj`` and ``v_proj`` of every attention of the decoder's two-way
  transformer, as finetune-SAM and SAMed do. Mergeable: ``samft export --merged`` folds it into SAM's decoder.
"""

from __future__ import annotations

from torch import nn

from samft.peft.inject import merge_layers, replace_modules
from samft.peft.lora import LoRALinear

DECODER_TARGETS = ("q_proj", "v_proj")


def _attention_linears(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_TARGETS


def place_decoder(decoder: nn.Module, mode: str, rank: int = 4, alpha: float = 4.0) -> list[str]:
    """Apply ``mode`` to a SemanticMaskDecoder (every parameter trainable on entry); returns the names of the
    decoder linears given LoRA (empty unless ``peft``)."""
    if mode == "full":
        return []
    decoder.requires_grad_(False)
    if getattr(decoder, "class_head", None) is not None:
        decoder.class_head.requires_grad_(True)
    if decoder.num_queries > 1:
        decoder.mask_tokens.requires_grad_(True)
    if mode != "peft":
        return []
    names = replace_modules(decoder.transformer, _attention_linears, lambda m: LoRALinear(m, rank, alpha),
                            "model.decoder=peft", f"{'/'.join(DECODER_TARGETS)} in the mask decoder")
    return [f"decoder.transformer.{n}" for n in names]


def merge_decoder(decoder: nn.Module) -> int:
    """Fold the decoder's LoRA into its linears (``model.decoder=peft``); returns how many."""
    return merge_layers(decoder, LoRALinear)
