"""SPViT's weight sharing: a bottleneck convolution derived from a block's own value and output projections.

For a block of width ``C`` with ``heads`` heads of ``d = C / heads`` channels, the value projection
``W_v`` (rows ``[2C:3C]`` of the fused ``qkv`` weight) splits into one (d x C) matrix ``W_v^h`` per head,
and the output projection ``W_o`` (C x C) into one (C x d) column block ``W_o^h`` per head. SPViT
assigns heads softly to the ``9`` positions of a 3x3 kernel with ``P = softmax_h(head_probs / alpha)``
(``head_probs`` is (heads, 9), the softmax runs over heads, so each position's column sums to one), and
derives

- the kernel at position ``p``: ``K_p = sum_h P[h, p] W_v^h`` (C -> d, the bottleneck), bias
  ``sum_p sum_h P[h, p] b_v^h`` (the 3x3 conv sums nine such projections) or ``sum_h P[h, c] b_v^h`` for
  the 1x1 conv, which uses the centre position ``c`` only;
- BatchNorm over the d channels and ReLU;
- the expansion back to C: ``sum_p sum_h P[h, p] W_o^h`` (3x3) or ``sum_h P[h, c] W_o^h`` (1x1), with
  ``W_o``'s bias.

Positions are numbered row-major, ``p = 3 * ky + kx`` (the reference numbers them column-major; with
``head_probs`` initialised to ones every position starts as the mean of the heads, so the numbering only
names the learned parameters). The convolution is an ``F.conv2d`` with the derived kernel on the whole
token grid (zero padding 1), never a (tokens x tokens) index mask.

The weights are the *effective* ones of the run: a LoRA layer contributes ``W0 + (alpha/r) B A``; a
Conv-LoRA layer its linear part ``W0 + (alpha/r) Wd We`` (its convolutional experts act on the low-rank
feature non-linearly and per window, so they cannot be folded into a convolution kernel and are
dropped for converted blocks); a wrapper with a ``merged()`` plain Linear (SSF) its merged weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samft.prune.errors import PruneError

POSITIONS = 9
CENTRE = 4


def effective_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias (out,) or None)`` that ``module`` applies linearly (see the module doc).

    Differentiable in LoRA/Conv-LoRA's ``lora_A``/``lora_B`` (so a search may train through them).
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Linear) and hasattr(module, "lora_A") and hasattr(module, "lora_B"):
        delta = (module.lora_B @ module.lora_A) * module.scaling
        return base.weight + delta.to(base.weight.dtype), base.bias
    merged = getattr(module, "merged", None)
    if callable(merged):
        plain = merged()
        if isinstance(plain, nn.Linear):
            return plain.weight, plain.bias
    raise PruneError(f"cannot read a linear weight from {type(module).__name__}: SPViT needs the block's qkv "
                     "and proj as nn.Linear, LoRA/Conv-LoRA or a mergeable wrapper")


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias ``module`` adds (a LoRA-style wrapper adds its base layer's), without building merged weights."""
    if isinstance(module, nn.Linear):
        return module.bias
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Linear) and hasattr(module, "lora_A"):
        return base.bias
    return effective_linear(module)[1]


def value_and_proj(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """From a SAM attention module: ``W_v`` (C, C), ``b_v`` (C,), ``W_o`` (C, C), ``b_o`` (C,) (effective)."""
    core = attn if hasattr(attn, "qkv") else getattr(attn, "base_layer", None)
    if core is None or not hasattr(core, "qkv") or not hasattr(core, "proj"):
        raise PruneError(f"attention {type(attn).__name__} has no qkv/proj to derive a convolution from")
    qkv_w, qkv_b = effective_linear(core.qkv)
    proj_w, proj_b = effective_linear(core.proj)
    dim = proj_w.shape[0]
    v_b = None if qkv_b is None else qkv_b[2 * dim:3 * dim]
    return qkv_w[2 * dim:3 * dim], v_b, proj_w, proj_b


def head_mixing(head_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``P`` (heads, 9): softmax over heads of ``head_probs / alpha``."""
    return (head_probs / alpha).softmax(dim=0)


def derive_conv(v_weight: torch.Tensor, v_bias: torch.Tensor | None, proj_weight: torch.Tensor,
                mixing: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The derived bottleneck: conv weight (d, C, k, k), conv bias (d,), expansion weight (C, d).

    ``v_weight`` (C, C), ``v_bias`` (C,) or None, ``proj_weight`` (C, C), ``mixing`` = P (heads, 9),
    ``kernel`` 3 or 1 (1 = the centre position only).
    """
    heads = mixing.shape[0]
    dim = v_weight.shape[1]
    d = v_weight.shape[0] // heads
    if kernel == 3:
        positions = mixing
    elif kernel == 1:
        positions = mixing[:, CENTRE:CENTRE + 1]
    else:
        raise PruneError(f"derived convolution: kernel {kernel} must be 3 or 1")
    per_head_v = v_weight.reshape(heads, d, dim)
    taps = torch.einsum("hp,hoc->poc", positions.to(v_weight.dtype), per_head_v)  # (k*k, d, C)
    weight = taps.permute(1, 2, 0).reshape(d, dim, kernel, kernel)  # position p = ky * k + kx
    weights_per_head = positions.sum(dim=1).to(v_weight.dtype)  # (heads,): sum over the used positions
    bias = torch.zeros(d, dtype=v_weight.dtype, device=v_weight.device) if v_bias is None else \
        (v_bias.reshape(heads, d) * weights_per_head[:, None]).sum(dim=0)
    per_head_o = proj_weight.reshape(proj_weight.shape[0], heads, d)  # (C, heads, d)
    expand = (per_head_o * weights_per_head[None, :, None]).sum(dim=1)  # (C, d)
    return weight, bias, expand


def bottleneck(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d,
               expand: torch.Tensor, expand_bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, W, C) -> conv (zero padding) -> BN -> ReLU -> expansion -> (B, H, W, C)."""
    k = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight.to(x.dtype), bias.to(x.dtype), padding=k // 2)
    y = F.relu(bn(y)).permute(0, 2, 3, 1)
    return F.linear(y, expand.to(y.dtype), None if expand_bias is None else expand_bias.to(y.dtype))


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics (those estimated in the search);
    its affine ``weight``/``bias`` still train. samft's checkpoints hold trainable parameters only, and SAM
    trains on batches of a few images, so batch statistics would be noisy and would be lost between the
    fine-tuning's validation and the saved run. Same state-dict keys as ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBottleneck(nn.Module):
    """The plain module a converted attention becomes: ``reduce`` Conv2d (C -> d, k x k, padding k // 2),
    ``bn`` BatchNorm2d(d) with frozen statistics (:class:`FrozenStatsBatchNorm2d`), ReLU, ``expand``
    Linear (d -> C). Shapes: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, bottleneck_dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.reduce = nn.Conv2d(dim, bottleneck_dim, kernel, padding=kernel // 2, bias=True)
        self.bn = FrozenStatsBatchNorm2d(bottleneck_dim)
        self.expand = nn.Linear(bottleneck_dim, dim)

    @classmethod
    def derived(cls, attn: nn.Module, head_probs: torch.Tensor, alpha: float, kernel: int,
                bn: nn.BatchNorm2d | None = None) -> "ConvBottleneck":
        """Built from ``attn``'s effective value/output projections and ``head_probs`` (heads, 9); ``bn``'s
        parameters and running statistics are copied when given (else a fresh BatchNorm)."""
        v_w, v_b, o_w, o_b = value_and_proj(attn)
        with torch.no_grad():
            weight, bias, expand = derive_conv(v_w, v_b, o_w, head_mixing(head_probs, alpha), kernel)
            out = cls(o_w.shape[0], weight.shape[0], kernel).to(device=weight.device, dtype=weight.dtype)
            out.reduce.weight.copy_(weight)
            out.reduce.bias.copy_(bias)
            out.expand.weight.copy_(expand)
            if o_b is None:
                out.expand.bias.zero_()
            else:
                out.expand.bias.copy_(o_b)
            if bn is not None:
                out.bn.load_state_dict(bn.state_dict())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.reduce(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        return self.expand(y)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}x{self.kernel}"
