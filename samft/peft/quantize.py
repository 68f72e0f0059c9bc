"""``model.quantize``: the frozen image encoder's linear weights stored in 4-bit NF4 or int8 (bitsandbytes), the
base of QLoRA (Dettmers et al. 2023).

:func:`quantize_encoder` replaces every ``nn.Linear`` of the encoder's blocks by bitsandbytes' ``Linear4bit``
(NF4 with double quantisation of the block scales, computing in float32) or ``Linear8bitLt``'s storage (int8 rows
with a float scale each, computing with the de-quantised weight: weight-only, see :func:`_int8_class`), quantised at once on the layer's device (moving the
model to CUDA afterwards moves the packed weights). The adapters of ``lora`` (every variant), ``conv_lora`` and
``hf``'s LoRA-like layers then wrap the quantised layer as their frozen ``base_layer``; they read its weight
through :func:`dense_weight` (the de-quantised float matrix, exactly the one the 4-bit forward multiplies with).
:func:`dequantize_encoder` puts plain ``nn.Linear`` layers with those weights back (the exports: a merged
checkpoint holds the de-quantised base plus the folded adapters).

bitsandbytes 0.50's CPU backend runs both forward and backward (a warning about its optional ``kernels``
package is harmless: the plain PyTorch path is used); on CUDA its kernels do. samft turns off its CPU inference
repacking (``support_avx512bf16_for_cpu``: on CPUs with AVX512-BF16, an eval-mode forward without grad rewrites
the packed weight in place with bfloat16 scales, so evaluation would compute with other weights than training,
and it fails for layers narrower than its 64-value block).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samft.errors import ConfigError
from samft.peft.inject import set_module

INSTALL = "pip install 'samft[quant]'"
KINDS = ("nf4", "int8")


def require_bnb() -> Any:
    """The ``bitsandbytes`` package, or a one-line ConfigError saying what to install."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"model.quantize needs bitsandbytes, which is not installed: {INSTALL}") from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of bitsandbytes' quantised linears (without importing bitsandbytes)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def quantized_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear`` (``kind``: nf4 or int8), quantised on ``linear``'s device."""
    bnb = require_bnb()
    weight = linear.weight.detach().clone()
    has_bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=weight.dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer.support_avx512bf16_for_cpu = False  # no in-place CPU repacking in eval: see the module docstring
    else:
        layer = _int8_class()(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                              threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantises when the parameters move


_INT8: list = []  # the weight-only int8 class, made once bitsandbytes is imported


def _int8_class() -> type:
    """bitsandbytes' ``Linear8bitLt`` (its int8 storage and per-row scales, its moves between devices) computing
    with the de-quantised weight: weight-only, as NF4. Its own LLM.int8 matmul also quantises the activations,
    except on the first call (which uses the weight's statistics before they move into its state), so its
    output would change after one step and differ from what the adapters and exports see."""
    if not _INT8:
        bnb = require_bnb()

        class Int8WeightOnly(bnb.nn.Linear8bitLt):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return F.linear(x, dense_weight(self).to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

        _INT8.append(Int8WeightOnly)
    return _INT8[0]


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The float (out, in) weight of a plain or quantised linear (de-quantised: what its forward uses)."""
    if not is_quantized(linear):
        return linear.weight
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # 4-bit
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).to(compute_dtype(linear))
    scale = weight.SCB if weight.SCB is not None else linear.state.SCB  # its first forward moves it to the state
    return weight.data.float() * scale[:, None].float() / 127.0  # int8 rows, one absmax scale each


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The float dtype a (possibly quantised) linear computes in."""
    if not is_quantized(linear):
        return linear.weight.dtype
    return getattr(linear, "compute_dtype", None) or torch.float32


def float_like(linear: nn.Module) -> torch.Tensor:
    """An empty tensor of the device and float dtype new parameters beside ``linear`` take."""
    return torch.empty(0, device=linear.weight.device, dtype=compute_dtype(linear))


def _replace(root: nn.Module, names: list[str], build) -> int:
    for name in names:
        set_module(root, name, build(root.get_submodule(name)))
    return len(names)


def quantize_encoder(encoder: nn.Module, kind: str) -> int:
    """Quantise every ``nn.Linear`` of the encoder's blocks in place; returns how many."""
    if kind not in KINDS:
        raise ConfigError(f"model.quantize: {kind!r}; choose from none, {', '.join(KINDS)}")
    names = [n for n, m in encoder.named_modules() if type(m) is nn.Linear and n.startswith("blocks.")]
    return _replace(encoder, names, lambda m: quantized_linear(m, kind))


def _plain(layer: nn.Module) -> nn.Linear:
    weight = dense_weight(layer)
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.requires_grad_(False)


def dequantize_encoder(root: nn.Module) -> int:
    """Replace every quantised linear under ``root`` (wrapped ones included) by a plain frozen ``nn.Linear`` of its
    de-quantised weight; returns how many."""
    names = [n for n, m in root.named_modules() if is_quantized(m)]
    return _replace(root, names, _plain)


def weight_bytes(linear: nn.Module) -> int:
    """Bytes of a linear's stored weight tensors (weight, bias and a quantised weight's scales and tables)."""
    return sum(t.numel() * t.element_size() for t in linear.state_dict().values() if torch.is_tensor(t))
