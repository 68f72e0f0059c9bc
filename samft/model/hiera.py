"""Building SAM 2.1 (``model.family: sam2``) from the official ``sam2`` package's classes.

Only the parts a semantic model uses are built: the image encoder (Hiera trunk + FPN neck), the prompt
encoder (its no-mask and not-a-point embeddings are the constant prompt), the mask decoder with its
high-resolution convolutions, and ``no_mem_embed`` (SAM 2 adds it to the stride-16 features of an image
seen without memory). They sit in :class:`Sam2Parts` under the names ``SAM2Base`` gives them, so the
official checkpoints (``sam2.1_hiera_*.pt``, key ``model``) load by name. The video-only parts of those
checkpoints (memory attention and encoder, object pointers) are recognised and left out.

The sizes are those of the official configs (``sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``), plus
``tiny`` (``model.tiny_hiera``), a random Hiera for CPU tests and the demo. ``sam2`` is imported only
here (lazily, by :func:`sam2_modules`): a SAM 1 run never imports it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
from torch import nn

from samft.config import ModelConfig
from samft.config.names import SAM2_TYPES, check_registered
from samft.errors import CheckpointError, ConfigError
from samft.model.sam import assign_state, check_state, read_checkpoint, weights_left_unfilled

SAM2_NATIVE_SIZE = 1024
SAM2_WIDTH = 256  # FPN neck = prompt encoder = mask decoder width of the official sizes


@dataclass(frozen=True)
class HieraSize:
    """One official SAM 2.1 size: the Hiera trunk's arguments (as in its YAML config) and the checkpoint name."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed: int
    checkpoint: str


SAM2_SIZES = {
    "hiera_t": HieraSize(96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), 7, "sam2.1_hiera_tiny.pt"),
    "hiera_s": HieraSize(96, 1, (1, 2, 11, 2), (7, 10, 13), (8, 4, 14, 7), 7, "sam2.1_hiera_small.pt"),
    "hiera_b+": HieraSize(112, 2, (2, 3, 16, 3), (12, 16, 20), (8, 4, 14, 7), 14, "sam2.1_hiera_base_plus.pt"),
    "hiera_l": HieraSize(144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), 7, "sam2.1_hiera_large.pt"),
}

# SAM2Base's parts that only video tracking uses: present in the official checkpoints, not built here
VIDEO_ONLY = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "obj_ptr_proj.",
              "obj_ptr_tpos_proj.", "mask_downsample.", "no_obj_ptr", "no_obj_embed_spatial")

INSTALL = "pip install 'samft[sam2]'"


def sam2_modules() -> SimpleNamespace:
    """The ``sam2`` classes samft builds from (imported on first use; one line saying what to install)."""
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
    except ImportError as e:
        raise ConfigError(f"model.family=sam2 needs the sam2 package ({e.name} is missing): {INSTALL}") from None
    return SimpleNamespace(Hiera=Hiera, FpnNeck=FpnNeck, ImageEncoder=ImageEncoder, MaskDecoder=MaskDecoder,
                           PositionEmbeddingSine=PositionEmbeddingSine, PromptEncoder=PromptEncoder,
                           TwoWayTransformer=TwoWayTransformer)


def _size(cfg: ModelConfig) -> tuple[HieraSize, int]:
    """(trunk arguments, width) of ``cfg.type``; the decoder's other sizes are fixed by ``SAM2Base``."""
    if cfg.type != "tiny":
        return SAM2_SIZES[cfg.type], SAM2_WIDTH
    t = cfg.tiny_hiera
    size = HieraSize(t.embed_dim, t.num_heads, tuple(t.stages), tuple(t.global_att_blocks), tuple(t.window_spec),
                     t.window_pos_embed, "")
    return size, t.d_model


class Sam2Parts(nn.Module):
    """The parts of ``SAM2Base`` a semantic model uses, under ``SAM2Base``'s own attribute names."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 width: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)


def build_image_encoder(size: HieraSize, width: int) -> nn.Module:
    """sam2's ``ImageEncoder``: the Hiera trunk and the FPN neck as the SAM 2.1 configs set them (scalp 1)."""
    m = sam2_modules()
    trunk = m.Hiera(embed_dim=size.embed_dim, num_heads=size.num_heads, stages=size.stages,
                    global_att_blocks=size.global_att_blocks, window_spec=size.window_spec,
                    window_pos_embed_bkg_spatial_size=(size.window_pos_embed, size.window_pos_embed))
    pos = m.PositionEmbeddingSine(num_pos_feats=width, normalize=True, scale=None, temperature=10000,
                                  warmup_cache=False)
    neck = m.FpnNeck(position_encoding=pos, d_model=width, backbone_channel_list=trunk.channel_list,
                     fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    return m.ImageEncoder(trunk=trunk, neck=neck, scalp=1)


def build_mask_decoder(width: int, num_multimask_outputs: int = 3) -> nn.Module:
    """SAM 2.1's mask decoder (high-resolution features, object score MLP) as ``SAM2Base`` builds it."""
    m = sam2_modules()
    return m.MaskDecoder(num_multimask_outputs=num_multimask_outputs,
                         transformer=m.TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=2048, num_heads=8),
                         transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=256,
                         use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
                         pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True)


def build_parts(cfg: ModelConfig) -> Sam2Parts:
    """The SAM 2.1 parts of ``cfg.type`` (random weights), prompt sizes at ``cfg.img_size``."""
    m = sam2_modules()
    size, width = _size(cfg)
    grid = cfg.img_size // 16
    prompt = m.PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                             input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=16)
    return Sam2Parts(build_image_encoder(size, width), prompt, build_mask_decoder(width), width)


def read_sam2_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a SAM 2.1 checkpoint, read with ``weights_only=True``."""
    path = Path(path)
    data = read_checkpoint(path)
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a SAM 2.1 checkpoint (a dict with key 'model': name -> tensor)")
    return state


def _found_size(state: dict[str, torch.Tensor]) -> str:
    """The official size a state dict's trunk has (width and depth), or a description of it."""
    pos = state.get("image_encoder.trunk.pos_embed")
    width = pos.shape[1] if pos is not None and pos.dim() == 4 else None
    depth = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    for name, size in SAM2_SIZES.items():
        if size.embed_dim == width and sum(size.stages) == depth:
            return name
    return f"unknown size (trunk width {width}, {depth} blocks)"


def load_sam2_checkpoint(parts: Sam2Parts, path: str | Path, model_type: str) -> None:
    """Load an official SAM 2.1 checkpoint (or one in its layout) strictly into ``parts``: every key of the
    built parts present with its shape, every other key one of ``SAM2Base``'s video-only parts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    load_sam2_state(parts, read_sam2_state(path), path, model_type, assign=True)


def load_sam2_state(parts: Sam2Parts, state: dict[str, torch.Tensor], source: str | Path, model_type: str,
                    assign: bool = False) -> None:
    """Load ``state`` (a ``SAM2Base`` state dict) strictly into ``parts`` (see :func:`load_sam2_checkpoint`);
    ``assign`` for parts built on the meta device."""
    own = parts.state_dict()
    found = _found_size(state)
    if model_type != "tiny" and found != model_type:
        raise CheckpointError(f"{source}: this is a SAM 2.1 {found} checkpoint but model.type is {model_type}")
    check_state(own, state, source, f"SAM 2.1 {model_type}", ignored=VIDEO_ONLY,
                holds=f" (the file holds SAM 2.1 {found})")
    kept = {k: state[k] for k in own}
    if assign:
        assign_state(parts, kept)
    else:
        parts.load_state_dict(kept, strict=True)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (no memory, no initialisation cost).

    Hiera's constructor calls ``.item()`` on a tensor, which ``torch.device("meta")`` forbids; here only the
    parameters are meta, other tensors stay on the CPU (the approach of accelerate's ``init_empty_weights``)."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_sam2(cfg: ModelConfig, meta: bool = False) -> Sam2Parts:
    """SAM 2.1 of ``cfg.type``: weights from ``cfg.checkpoint``, else random (seeded by ``cfg.seed``).

    ``meta=True`` builds the structure with meta parameters (no weights, no memory). With a checkpoint the
    weights are not filled first (:func:`samft.model.sam.weights_left_unfilled`): the strict load replaces them."""
    unfilled = weights_left_unfilled() if cfg.checkpoint and not meta else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), (meta_parameters() if meta else contextlib.nullcontext()), unfilled:
        torch.manual_seed(cfg.seed)
        parts = build_parts(cfg)
    if not meta:
        if cfg.checkpoint:
            load_sam2_checkpoint(parts, cfg.checkpoint, cfg.type)
        elif cfg.type != "tiny":
            warnings.warn(f"model.checkpoint is null: SAM 2.1 {cfg.type} has random weights. Pass model.checkpoint="
                          f"PATH to an official checkpoint (e.g. {SAM2_SIZES[cfg.type].checkpoint}) to fine-tune "
                          "the pretrained model.", stacklevel=2)
        parts.eval()
    return parts


def build_sam2_base(cfg: ModelConfig) -> nn.Module:
    """The whole ``SAM2Base`` of ``cfg.type`` (random weights), memory parts as the SAM 2.1 configs set them
    (one memory-attention layer for ``tiny``): what official checkpoints hold and merged exports must load
    into strictly. Not used for training."""
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.sam2_base import SAM2Base
    from sam2.modeling.sam.transformer import RoPEAttention

    m = sam2_modules()
    size, width = _size(cfg)
    mem = 64 if cfg.type != "tiny" else width // 2
    grid = (cfg.img_size // 16, cfg.img_size // 16)
    rope = dict(rope_theta=10000.0, feat_sizes=grid, embedding_dim=width, num_heads=1, downsample_rate=1, dropout=0.1)
    layer = MemoryAttentionLayer(activation="relu", cross_attention=RoPEAttention(rope_k_repeat=True, kv_in_dim=mem,
                                                                                  **rope),
                                 d_model=width, dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False,
                                 pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
                                 self_attention=RoPEAttention(**rope))
    attention = MemoryAttention(d_model=width, pos_enc_at_input=True, layer=layer,
                                num_layers=4 if cfg.type != "tiny" else 1)
    fuser = Fuser(CXBlock(dim=width, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
                  num_layers=2)
    encoder = MemoryEncoder(out_dim=mem, mask_downsampler=MaskDownSampler(kernel_size=3, stride=2, padding=1),
                            fuser=fuser, position_encoding=m.PositionEmbeddingSine(num_pos_feats=mem, warmup_cache=False),
                            in_dim=width)
    return SAM2Base(build_image_encoder(size, width), attention, encoder, num_maskmem=7, image_size=cfg.img_size,
                    sigmoid_scale_for_mem_enc=20.0, sigmoid_bias_for_mem_enc=-10.0,
                    use_mask_input_as_output_without_sam=True, directly_add_no_mem_embed=True,
                    no_obj_embed_spatial=True, use_high_res_features_in_sam=True, multimask_output_in_sam=True,
                    iou_prediction_use_sigmoid=True, use_obj_ptrs_in_encoder=True, add_tpos_enc_to_obj_ptrs=True,
                    proj_tpos_enc_in_obj_ptrs=True, use_signed_tpos_enc_to_obj_ptrs=True,
                    only_obj_ptrs_in_the_past_for_eval=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
                    fixed_no_obj_ptr=True, multimask_output_for_tracking=True, use_multimask_token_for_obj_ptr=True,
                    multimask_min_pt_num=0, multimask_max_pt_num=1, use_mlp_for_obj_ptr_proj=True)


def sam2_sizes() -> dict[str, Any]:
    """The sizes ``model.type`` accepts for ``model.family=sam2`` (``tiny`` first)."""
    return {"tiny": None, **SAM2_SIZES}


for _name in sam2_sizes():
    check_registered("SAM 2.1 size", _name, SAM2_TYPES)
