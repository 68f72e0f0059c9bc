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
from typing import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.build_sam import sam_model_registry
from torch import nn

from samft.config import ModelConfig
from samft.config.names import SAM_TYPES, check_registered
from samft.constants import PATCH, PIXEL_MEAN, PIXEL_STD  # noqa: F401  (re-exported)
from samft.files import atomic_write_text
from samft.errors import CheckpointError, load_failure

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


def read_checkpoint(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, or a CheckpointError naming the file.

    Read, not mapped (``mmap=True``): a mapped file that is replaced in place during a long CPU run (a new
    download over the old one) would end that run with SIGBUS, and reading costs ViT-H about a second."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable checkpoint"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({load_failure(e)})") from None


def assign_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` strictly by assigning its tensors to ``module`` (no second copy of the weights), each in the
    dtype the module's own tensor has; the module's ``requires_grad`` flags are kept."""
    dtypes = {k: v.dtype for k, v in module.state_dict().items()}
    module.load_state_dict({k: v if k not in dtypes or v.dtype == dtypes[k] else v.to(dtypes[k])
                            for k, v in state.items()}, strict=True, assign=True)


def _read_state_dict(path: Path) -> dict:
    """The state dict in ``path`` (:func:`read_checkpoint`), unwrapped from a one-key wrapper."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"model": {...}} / {"state_dict": {...}} wrappers
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a SAM state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_checkpoint(sam: Sam, path: str | Path, model_type: str) -> None:
    """Load an official SAM checkpoint strictly, naming the file and what is wrong on a mismatch.

    The tensors read become the model's (``assign``): no second copy of the weights in memory (the structure
    was built without filling them, :func:`weights_left_unfilled`; ``scripts/bench_load.py``)."""
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
    check_state(sam.state_dict(), state, path, f"SAM {model_type}")
    assign_state(sam, state)


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str | Path, model: str,
                ignored: tuple[str, ...] = (), holds: str = "") -> None:
    """``state`` (a checkpoint's) holds every key of ``own`` (the built model's) with its shape and no other key
    but those starting with ``ignored``; else a CheckpointError naming ``source``, ``model`` and the first keys
    (``holds``: what the file was recognised as, added to a shape mismatch)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(ignored))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match {model}: {len(missing)} missing keys {missing[:3]}, "
                              f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{source}: tensor {k} has shape {got}, {model} expects {want}{holds}")


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


@dataclass(frozen=True)
class SamSize:
    """One entry of the size registry: how to build the model, load its weights, and its native input."""

    name: str
    build: Callable[[ModelConfig], Sam]  # the structure with random weights
    load: Callable[[Sam, str | Path, str], None]  # checkpoint -> the built model (strict, clear errors)
    native_size: Callable[[ModelConfig], int]  # the input size its pos_embed is made for
    official: bool  # has official checkpoints (random weights get a warning)


def _official(name: str) -> SamSize:
    return SamSize(name, lambda cfg: sam_model_registry[name](checkpoint=None), load_checkpoint,
                   lambda cfg: SAM_NATIVE_SIZE, True)


SAM_NATIVE_SIZE = 1024


def sam_sizes() -> dict[str, SamSize]:
    """The registry: ``tiny`` (built at ``model.img_size`` from ``model.tiny``) and the official sizes."""
    return {"tiny": SamSize("tiny", build_tiny, load_tiny_checkpoint, lambda cfg: cfg.img_size, False),
            **{name: _official(name) for name in ("vit_b", "vit_l", "vit_h")}}


def sam_size(name: str) -> SamSize:
    sizes = sam_sizes()
    if name not in sizes:
        raise CheckpointError(f"model.type: {name!r} is not one of {', '.join(sizes)}")
    return sizes[name]


# torch.nn.init's functions that module constructors (Linear, Conv, LayerNorm, Embedding ...) fill weights with
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")


@contextlib.contextmanager
def weights_left_unfilled():
    """Module constructors inside skip filling their weights (``torch.nn.init``'s functions return the tensor
    as it is): for a model whose every weight a strict checkpoint load replaces right after, the random
    initialisation is wasted work (ViT-H: 636M random numbers at every train, eval and predict). The functions
    are restored on leaving, error or not. Not for use while another thread builds modules."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS if hasattr(nn.init, name)}

    def unfilled(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, unfilled)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_sam(cfg: ModelConfig, meta: bool = False) -> Sam:
    """SAM of ``cfg.type`` at ``cfg.img_size``: weights from ``cfg.checkpoint``, else random.

    ``meta=True`` builds the structure without weights (instantly, no memory), for counting parameters. With a
    checkpoint the structure is built without random initialisation (:func:`weights_left_unfilled`): the
    strict load replaces every parameter and saved buffer (tested equal to the initialised build).
    """
    size = sam_size(cfg.type)
    unfilled = weights_left_unfilled() if cfg.checkpoint and not meta else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()), unfilled:
        torch.manual_seed(cfg.seed)
        sam = size.build(cfg)
    if not meta:
        if cfg.checkpoint:
            size.load(sam, cfg.checkpoint, cfg.type)
        elif size.official:
            warnings.warn(
                f"model.checkpoint is null: SAM {cfg.type} has random weights. Pass model.checkpoint=PATH to an "
                "official checkpoint (e.g. sam_vit_b_01ec64.pth) to fine-tune the pretrained model.",
                stacklevel=2,
            )
    set_image_size(sam, cfg.img_size)
    if not meta:
        sam.eval()
    return sam


def load_tiny_checkpoint(sam: Sam, path: str | Path, model_type: str = "tiny") -> None:
    """A tiny model's base weights saved with ``torch.save(sam.state_dict())`` (tests, custom bases)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    state = _read_state_dict(path)
    own = sam.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the tiny SAM of this config: {len(missing)} missing keys "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]} (compare model.tiny)")
    for key in own:
        if state[key].shape == own[key].shape:
            continue
        if key == "image_encoder.pos_embed" and state[key].shape[-1] == own[key].shape[-1]:
            state[key] = interpolate_pos_embed(state[key], tuple(own[key].shape[1:3]))  # saved at another img_size
        elif key.endswith((".rel_pos_h", ".rel_pos_w")) and state[key].shape[-1] == own[key].shape[-1]:
            module, name = key.rsplit(".", 1)  # SAM's attention interpolates its tables to the grid it sees
            setattr(sam.get_submodule(module), name, nn.Parameter(torch.empty_like(state[key])))
        else:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(state[key].shape)}, the tiny SAM of this "
                                  f"config expects {tuple(own[key].shape)} (compare model.tiny)")
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
        atomic_write_text(cache_path, json.dumps(cache))
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


for _name in sam_sizes():  # the registry is complete here
    check_registered("SAM size", _name, SAM_TYPES)  # what model.type accepts
