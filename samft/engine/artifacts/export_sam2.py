"""A merged SAM 2.1 run (``model.family: sam2``) in the official SAM 2.1 layout, and back.

:func:`sam2_merged_state` gives the state dict of a whole ``SAM2Base`` (what ``sam2.1_hiera_*.pt`` holds
under the key ``model``, and what ``sam2.build_sam.build_sam2`` loads strictly for the official sizes):

- the image encoder (Hiera trunk + FPN neck, the adapters folded in), the prompt encoder and
  ``no_mem_embed``: the run's, under ``SAM2Base``'s names (:func:`~samft.model.hiera_encoder.official_key`);
- the mask decoder: the trained parts where SAM 2 has them (two-way transformer, IoU and object-score
  tokens, output upscaling, ``conv_s0``/``conv_s1``, mask token 0 and hypernetwork 0); its IoU and
  object-score heads and multimask tokens as in the base;
- the video-only parts the run never had (memory attention and encoder, object pointers, ...): copied from
  the base checkpoint (``model.checkpoint``) when the run has one, else random (seeded by ``model.seed``,
  as the run's random base): the file then loads strictly, but video tracking would need trained ones.

:func:`merged_sam2_model` rebuilds the semantic model from such a file and its head file.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from samft.engine.artifacts.merged_decoder import decoder_into
from samft.errors import SamftError
from samft.model.hiera import VIDEO_ONLY, build_sam2, build_sam2_base, load_sam2_state, read_sam2_state
from samft.model.hiera_encoder import official_key
from samft.model.semantic2 import SemanticSAM2

DECODER = "sam_mask_decoder."


def _base_state(model_cfg) -> tuple[dict[str, torch.Tensor], str]:
    """A whole SAM2Base's state with the base's weights wherever the base has them; and where the
    video-only parts come from (words for the export's message)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.seed)
        state = {k: v.detach().clone() for k, v in build_sam2_base(model_cfg).state_dict().items()}
    if model_cfg.checkpoint:
        source = read_sam2_state(model_cfg.checkpoint)
        video = [k for k in state if k.startswith(VIDEO_ONLY)]
        copied = sum(k in source for k in video)
        where = "copied from the base checkpoint" if copied == len(video) else \
            f"{copied} of {len(video)} copied from the base checkpoint, the others random"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "random weights": the run was trained on them, as the user knows
            source = build_sam2(model_cfg).state_dict()
        where = "random (the run has no base checkpoint; video tracking would need trained ones)"
    for k, v in source.items():
        if k in state and state[k].shape == v.shape:
            state[k] = v.detach().clone()
    return state, where


def _put(state: dict[str, torch.Tensor], key: str, value: torch.Tensor, name: str) -> None:
    if key not in state:
        raise SamftError(f"merged tensor {name} is not part of SAM 2.1 (a wrapper was left unmerged?)")
    if state[key].shape != value.shape:
        raise SamftError(f"merged tensor {name} has shape {tuple(value.shape)}, SAM 2.1 has {tuple(state[key].shape)}")
    state[key] = value.detach().clone()


def sam2_merged_state(model: SemanticSAM2, model_cfg) -> tuple[dict[str, torch.Tensor], str]:
    """The SAM2Base state dict of a merged run (see the module docstring) and where its video-only parts
    come from. ``model``'s adapters must be folded already."""
    state, where = _base_state(model_cfg)
    for k, v in model.image_encoder.state_dict().items():
        _put(state, f"image_encoder.{official_key(k)}", v, f"image_encoder.{k}")
    for k, v in model.prompt_encoder.state_dict().items():
        _put(state, f"sam_prompt_encoder.{k}", v, f"prompt_encoder.{k}")
    _put(state, "no_mem_embed", model.no_mem_embed, "no_mem_embed")
    decoder_into(state, model.decoder.state_dict(), DECODER)
    return state, where


def merged_sam2_model(export, cfg, num_queries: int, num_classes: int) -> SemanticSAM2:
    """The semantic SAM 2.1 of a merged export (``export.data``: the SAM2Base state dict), its decoder head
    not loaded yet; the file's image-model parts are checked and loaded strictly."""
    model_cfg = dataclasses.replace(cfg.model, checkpoint=None)
    parts = build_sam2(model_cfg, meta=True)
    load_sam2_state(parts, export.data, export.path, model_cfg.type, assign=True)
    return SemanticSAM2(parts, num_queries, num_classes, img_size=model_cfg.img_size)
