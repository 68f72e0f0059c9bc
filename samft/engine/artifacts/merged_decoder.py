"""The trained semantic decoder written into the base's own mask decoder (SAM 1 and SAM 2.1 merges alike)."""

from __future__ import annotations

import torch


def decoder_into(state: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor], prefix: str) -> None:
    """Write a ``SemanticMaskDecoder`` state dict into ``state``'s mask decoder (names under ``prefix``) where
    the base has the same tensor: mask token 0 and hypernetwork 0 take the semantic decoder's first query's;
    the base's other mask tokens, its IoU head (and SAM 2's object-score head) stay; the class head, which the
    base has no place for, is left to the head file."""
    for k, v in decoder.items():
        if k == "mask_tokens.weight":
            target = state[f"{prefix}mask_tokens.weight"]
            if v.shape[1:] == target.shape[1:]:
                target[0] = v[0]
            continue
        key = f"{prefix}output_hypernetworks_mlps.0.{k[len('hypernetwork.'):]}" if k.startswith(
            "hypernetwork.") else f"{prefix}{k}"
        if key in state and state[key].shape == v.shape:
            state[key] = v.detach().clone()
