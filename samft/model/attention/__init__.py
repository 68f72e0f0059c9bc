"""The encoder's attention implementations, registered by name (``model.attention``).

Every implementation is a module built from one of ``segment_anything``'s ``Attention`` modules. It
takes over that module's parameters under the same names (``qkv``, ``proj``, ``rel_pos_h``,
``rel_pos_w``) and attributes (``num_heads``, ``scale``, ``use_rel_pos``), so state-dict keys, saved
adapters, official checkpoints and PEFT methods that wrap ``attn.qkv`` or ``blk.attn`` keep working;
it may add parameters of its own (BRA's LEPE convolution).

Contract of an implementation's ``forward(x, extra_kv=None)``:

- ``x`` (B, H, W, C): a whole token map (global blocks) or B * windows windows (windowed blocks);
  returns (B, H, W, C).
- ``extra_kv``: optional extra keys and values, (T, C) each, already projected (VPT's prompts); every
  query also attends to them, with no relative-position bias. ``None`` computes SAM's function.

:func:`set_attention` replaces every block's ``attn`` of an encoder. An implementation decides per
block whether it applies (``applies(block, options)``); where it does not, the registry's ``fallback``
(sdpa) is used. Apply it before the PEFT method.

An implementation whose forward cannot be exported to ONNX sets ``onnx_exportable = False``.

Adding an implementation: one module of this package with a subclass of :class:`EncoderAttention`
decorated by :func:`register_attention` (modules are discovered on first use, like PEFT methods), and its
name in ``samft.config.names.ATTENTIONS`` (what ``model.attention`` accepts; registering checks it).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, ClassVar, Optional

import torch
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from samft.config.names import ATTENTIONS, check_registered
from samft.errors import ConfigError

_INFRASTRUCTURE = {"bias"}
FALLBACK = "sdpa"

ExtraKV = Optional[tuple[torch.Tensor, torch.Tensor]]


class EncoderAttention(nn.Module):
    """Base of the registered implementations: SAM's ``Attention`` parameters, taken over by name."""

    kind: ClassVar[str] = ""
    dense: ClassVar[bool] = True  # computes SAM's own attention function (eager, sdpa); False: another one (bra)
    # False: its forward does not trace to a static ONNX graph; ``samft export --onnx`` then refuses
    # the model with an error naming ``model.attention`` instead of failing inside the exporter
    onnx_exportable: ClassVar[bool] = True

    def __init__(self, attn: nn.Module, options: Any = None) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        # Hiera's MultiScaleAttention: no rel-pos, SDPA's default scale, query pooling at stage changes
        self.scale = getattr(attn, "scale", None) or (attn.proj.out_features // attn.num_heads) ** -0.5
        self.use_rel_pos = getattr(attn, "use_rel_pos", False)
        self.qkv = attn.qkv
        self.proj = attn.proj
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w
        self.q_pool = getattr(attn, "q_pool", None)
        self.options = options

    @classmethod
    def applies(cls, block: nn.Module, options: Any) -> bool:
        """Whether this implementation replaces the attention of ``block`` (a SAM encoder block)."""
        return True

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, H, W, C) -> q, k, v (B, heads, H*W, head_dim) each, from ``qkv`` (PEFT layers included)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def pool_q(self, q: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        """Hiera's query pooling (``q_pool``, at stage changes): q (B, heads, H*W, hd) -> (B, heads, h'*w', hd)
        pooled per channel on the grid, and (h', w'); unchanged without ``q_pool``."""
        if self.q_pool is None:
            return q, h, w
        b, n, _, d = q.shape
        grid = self.q_pool(q.reshape(b * n, h, w, d).permute(0, 3, 1, 2))
        qh, qw = grid.shape[-2:]
        return grid.permute(0, 2, 3, 1).reshape(b, n, qh * qw, d), qh, qw

    def heads_kv(self, extra_kv: tuple[torch.Tensor, torch.Tensor], batch: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Extra keys/values (T, C) each -> (B, heads, T, head_dim) each."""
        k, v = (t.reshape(t.shape[0], self.num_heads, -1).transpose(0, 1).unsqueeze(0)
                .expand(batch, -1, -1, -1).to(dtype) for t in extra_kv)
        return k, v

    def merge_heads(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, heads, H*W, head_dim) -> ``proj`` of (B, H, W, C)."""
        b = out.shape[0]
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def forward(self, x: torch.Tensor, extra_kv: ExtraKV = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.num_heads}, rel_pos={self.use_rel_pos}"


_REGISTRY: dict[str, type[EncoderAttention]] = {}
_HELP: dict[str, str] = {}


def register_attention(name: str, help: str) -> Callable[[type], type]:
    """Class decorator registering an :class:`EncoderAttention` subclass as ``model.attention=name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"attention implementation {name!r} registered twice")
        check_registered("attention implementation", name, ATTENTIONS)  # what model.attention accepts
        cls.kind = name
        _REGISTRY[name] = cls
        _HELP[name] = help
        return cls

    return deco


_DISCOVERED: list[bool] = []


def _discover() -> None:
    if _DISCOVERED:
        return
    _DISCOVERED.append(True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def attention_names() -> tuple[str, ...]:
    """The registered implementation names (what ``model.attention`` accepts), the fallback first."""
    _discover()
    return (FALLBACK,) + tuple(sorted(n for n in _REGISTRY if n != FALLBACK))


def get_attention(name: str) -> type[EncoderAttention]:
    names = attention_names()
    if name not in _REGISTRY:
        raise ConfigError(f"model.attention: {name!r} is not one of {', '.join(names)}")
    return _REGISTRY[name]


def _sam_attention(module: nn.Module) -> bool:
    """SAM's Attention, Hiera's MultiScaleAttention (when sam2 is loaded) or a registered implementation."""
    import sys

    hiera = sys.modules.get("sam2.modeling.backbones.hieradet")  # not imported: no Hiera module exists
    kinds = (Attention, EncoderAttention) + ((hiera.MultiScaleAttention,) if hiera is not None else ())
    return isinstance(module, kinds)


def convert_attention(attn: nn.Module, name: str, options: Any = None) -> EncoderAttention:
    """A new ``name`` module holding ``attn``'s parameters (``attn`` is SAM's or a registered one)."""
    if not _sam_attention(attn):
        raise ConfigError(f"model.attention: {type(attn).__name__} is not SAM's Attention")
    return get_attention(name)(attn, options)


def set_attention(encoder: nn.Module, name: str = FALLBACK, options: Any = None) -> int:
    """Give every block of SAM's ``encoder`` the ``name`` attention (or the fallback where it does not
    apply); returns how many blocks use ``name``."""
    cls = get_attention(name)
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise ConfigError(f"model.attention: {type(encoder).__name__} is not SAM's image encoder (no blocks)")
    count = 0
    for block in blocks:
        if not _sam_attention(getattr(block, "attn", None)):
            raise ConfigError(f"model.attention: block {type(block).__name__} has no SAM attention to replace "
                              "(set the attention before applying a PEFT method)")
        use = cls if cls.applies(block, options) else get_attention(FALLBACK)
        block.attn = use(block.attn, options)
        count += use is cls
    return count


def attention_function(name: str) -> str:
    """``dense`` for implementations of SAM's own attention function (interchangeable: an adapter trained
    with one runs on another), else the name itself (``bra``)."""
    _discover()
    cls = _REGISTRY.get(name)
    return "dense" if cls is not None and cls.dense else name


def attention_impl(encoder: nn.Module) -> str:
    """The implementation name the encoder's attention modules use, ``mixed`` or ``none``."""
    kinds = {m.kind if isinstance(m, EncoderAttention) else "eager" for m in encoder.modules() if _sam_attention(m)}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")


def _unwrap(attn: Optional[nn.Module]) -> Optional[nn.Module]:
    """The attention inside PEFT wrappers (VPT wraps the whole attention and keeps it as ``base_layer``)."""
    while attn is not None and not isinstance(attn, EncoderAttention) and hasattr(attn, "base_layer"):
        attn = attn.base_layer
    return attn


def attention_kinds(encoder: nn.Module) -> list[str]:
    """Per block, the implementation its attention uses (looked up inside PEFT wrappers)."""
    kinds = []
    for block in encoder.blocks:
        attn = _unwrap(getattr(block, "attn", None))  # a pruned block may have none (SPViT's skip or conv)
        kinds.append(attn.kind if isinstance(attn, EncoderAttention) else "eager" if attn is not None else "none")
    return kinds


from samft.model.attention.bias import rel_pos_bias  # noqa: E402  (re-exported)

__all__ = ["EncoderAttention", "attention_function", "attention_names", "attention_impl", "attention_kinds", "convert_attention",
           "get_attention", "register_attention", "rel_pos_bias", "set_attention", "FALLBACK"]
