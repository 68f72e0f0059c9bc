"""Building SAM from ``segment_anything``: official sizes from a checkpoint, a tiny size for CPU, resizing.

Official checkpoints (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) are
flat state dicts; they are loaded with a strict key check. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.build_sam import sam_model_registry
from torch import nn

from samft.config import ModelConfig
from samft.constants import PIXEL_MEAN, PIXEL_STD  # noqa: F401  (re-exported)
from samft.errors import CheckpointError

PATCH = 16

# encoder width -> (type, depth) of the official checkpoints, to name a wrong file
OFFICIAL = {768: ("vit_b", 12), 1024: ("vit_l", 24), 1280: ("vit_h", 32)}


def build_tiny(cfg: ModelConfig) -> Sam:
    """SAM from the real classes at CPU-friendly sizes (see ``TinyConfig``)."""
    t = cfg.tiny
    grid = cfg.img_size // PATCH
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=t.depth,
            embed_dim=t.embed_dim,
            img_size=cfg.img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=t.num_heads,
            patch_size=PATCH,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(t.global_attn_indexes),
            window_size=t.window_size,
            out_chans=t.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=t.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=t.decoder_depth, embedding_dim=t.out_chans, mlp_dim=t.decoder_mlp_dim, num_heads=t.decoder_heads
            ),
            transformer_dim=t.out_chans,
            iou_head_depth=3,
            iou_head_hidden_dim=t.out_chans,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable checkpoint"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"model": {...}} / {"state_dict": {...}} wrappers
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a SAM state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_checkpoint(sam: Sam, path: str | Path, model_type: str) -> None:
    """Load an official SAM checkpoint strictly, naming the file and what is wrong on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    state = _read_state_dict(path)
    pos = state.get("image_encoder.pos_embed")
    if pos is not None and pos.dim() == 4:
        width = pos.shape[-1]
        depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
        found = OFFICIAL.get(width, (f"unknown (encoder width {width})", depth))[0]
        expected_width = sam.image_encoder.pos_embed.shape[-1]
        if width != expected_width or depth != len(sam.image_encoder.blocks):
            raise CheckpointError(
                f"{path}: this is a {found} checkpoint (encoder width {width}, {depth} blocks) but model.type is "
                f"{model_type} (width {expected_width}, {len(sam.image_encoder.blocks)} blocks)"
            )
    model_keys = set(sam.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match SAM {model_type}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    own = sam.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{path}: tensor {k} has shape {got}, SAM {model_type} expects {want}")
    sam.load_state_dict(state, strict=True)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize an absolute position embedding (1, h, w, C) to (1, grid[0], grid[1], C), bicubic."""
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    shrink = grid[0] < pos_embed.shape[1] or grid[1] < pos_embed.shape[2]
    x = pos_embed.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=shrink)
    return x.to(pos_embed.dtype).permute(0, 2, 3, 1)


def set_image_size(sam: Sam, img_size: int) -> None:
    """Adapt a SAM built for one input size to another (multiple of 16).

    The absolute ``pos_embed`` is interpolated; the relative-position tables stay as they are, SAM's
    attention interpolates them to the token grid it sees.
    """
    grid = img_size // PATCH
    enc = sam.image_encoder
    if enc.pos_embed is not None and enc.pos_embed.shape[1] != grid:
        enc.pos_embed = nn.Parameter(interpolate_pos_embed(enc.pos_embed.data, (grid, grid)),
                                     requires_grad=enc.pos_embed.requires_grad)
    enc.img_size = img_size
    pe = sam.prompt_encoder
    pe.image_embedding_size = (grid, grid)
    pe.input_image_size = (img_size, img_size)
    pe.mask_input_size = (4 * grid, 4 * grid)


def build_sam(cfg: ModelConfig, meta: bool = False) -> Sam:
    """SAM of ``cfg.type`` at ``cfg.img_size``: official weights from ``cfg.checkpoint``, else random.

    ``meta=True`` builds the structure without weights (instantly, no memory), for counting parameters.
    """
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
        torch.manual_seed(cfg.seed)
        if cfg.type == "tiny":
            sam = build_tiny(cfg)
        else:
            sam = sam_model_registry[cfg.type](checkpoint=None)
    if meta:
        set_image_size(sam, cfg.img_size)
        return sam
    if cfg.checkpoint:
        if cfg.type == "tiny":
            load_tiny_checkpoint(sam, cfg.checkpoint)
        else:
            load_checkpoint(sam, cfg.checkpoint, cfg.type)
    elif cfg.type != "tiny":
        warnings.warn(
            f"model.checkpoint is null: SAM {cfg.type} has random weights. Pass model.checkpoint=PATH to an "
            "official checkpoint (e.g. sam_vit_b_01ec64.pth) to fine-tune the pretrained model.",
            stacklevel=2,
        )
    if cfg.type != "tiny":
        set_image_size(sam, cfg.img_size)
    sam.eval()
    return sam


def load_tiny_checkpoint(sam: Sam, path: str | Path) -> None:
    """A tiny model's base weights saved with ``torch.save(sam.state_dict())`` (tests, custom bases)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    state = _read_state_dict(path)
    own = sam.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{path}: does not match the tiny SAM of this config (keys or shapes differ)")
    sam.load_state_dict(state, strict=True)


def _cache_file() -> Path:
    root = Path(os.environ.get("SAMFT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samft"))
    return root / "sha256.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (absolute path, size, mtime) so multi-GB checkpoints hash once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # the cache is an optimisation only
    return digest


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's tensors (sorted by name): the identity of randomly initialised weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_fingerprint(cfg: ModelConfig, sam: Sam) -> str:
    """Identity of the frozen base: the checkpoint file's sha256, or a hash of the random weights."""
    if cfg.checkpoint:
        return file_sha256(cfg.checkpoint)
    return "random:" + weights_sha256(sam)
