"""``SearchBlock``: a SAM encoder block with SPViT's single-path search space.

Wraps a ``segment_anything`` ``Block`` (``norm1``, ``attn``, ``norm2``, ``mlp`` with ``lin1``/``act``/
``lin2``, ``window_size``), keeping its modules under their names, and adds

- ``attn_thresholds`` (3,): the gates of the 1x1 conv, 3x3 conv and MSA (nested, see ``gates``);
- ``head_probs`` (heads, 9) and two BatchNorms (``bn3``, ``bn1``) of the derived convolutions;
- ``mlp_thresholds`` (hidden,): one keep gate per MLP hidden unit (``lin1`` row / ``lin2`` column).

Forward, x (B, H, W, C) -> (B, H, W, C)::

    y   = norm1(x)
    out = i3 * MSA(y) + i2 (1 - i3) * conv3x3(y) + i1 (1 - i2)(1 - i3) * conv1x1(y)
    x   = x + out
    x   = x + lin2(m * act(lin1(norm2(x))))        (m: the unit gates)

MSA runs on SAM's windows (windowed blocks) as in SAM; the derived convolutions run on the whole token
grid. All paths are computed in training (the reference's single-path mixture); in evaluation, paths
whose weight is zero are not computed (same result, less work). When every unit gate is off the MLP's
output bias is dropped too, so that "all off" is the residual alone, like the rebuilt block that has no
MLP at all.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from samft.prune.derived import (POSITIONS, bottleneck, derive_conv, effective_bias, effective_linear, head_mixing,
                                 value_and_proj)
from samft.prune.errors import PruneError
from samft.prune.gates import choice, gate_values, mixer_weights, nested, threshold_ste

THETA = 1.5
ALPHA = 1e-2


def attention_core(attn: nn.Module) -> nn.Module:
    """The module holding ``qkv``/``proj``/``num_heads`` (``attn`` itself, or the one a wrapper holds)."""
    if hasattr(attn, "qkv"):
        return attn
    base = getattr(attn, "base_layer", None)
    if base is not None and hasattr(base, "qkv"):
        return base
    raise PruneError(f"attention {type(attn).__name__} has no qkv/proj (SPViT needs SAM's attention)")


def out_features(linear: nn.Module) -> int:
    """Output width of a Linear or of a PEFT wrapper around one."""
    base = linear if isinstance(linear, nn.Linear) else getattr(linear, "base_layer", None)
    if not isinstance(base, nn.Linear):
        raise PruneError(f"{type(linear).__name__} is not a Linear or a wrapper around one")
    return base.out_features


def check_block(block: nn.Module, index: int) -> None:
    """Raise a PruneError unless ``block`` has SAM's Block structure."""
    mlp = getattr(block, "mlp", None)
    missing = [n for n in ("norm1", "attn", "norm2", "mlp", "window_size") if not hasattr(block, n)]
    missing += [f"mlp.{n}" for n in ("lin1", "act", "lin2") if mlp is not None and not hasattr(mlp, n)]
    if missing:
        raise PruneError(f"encoder block {index} ({type(block).__name__}) lacks {', '.join(missing)}: SPViT prunes "
                         "SAM's Block (a PEFT method that wraps whole blocks or MLPs cannot be pruned)")
    attention_core(block.attn)


class SearchBlock(nn.Module):
    """SPViT's searchable block around SAM's ``block`` (see the module docstring)."""

    def __init__(self, block: nn.Module, alpha: float = ALPHA, theta: float = THETA, index: int = 0) -> None:
        super().__init__()
        check_block(block, index)
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        core = attention_core(block.attn)
        self.num_heads = core.num_heads
        self.use_rel_pos = bool(getattr(core, "use_rel_pos", False))
        like = effective_linear(core.proj)[0]
        self.dim = like.shape[0]
        self.head_dim = self.dim // self.num_heads
        self.hidden = out_features(block.mlp.lin1)
        self.alpha = alpha
        kw = {"device": like.device, "dtype": torch.float32}
        self.attn_thresholds = nn.Parameter(torch.full((3,), float(theta), **kw))
        self.mlp_thresholds = nn.Parameter(torch.full((self.hidden,), float(theta), **kw))
        self.head_probs = nn.Parameter(torch.ones(self.num_heads, POSITIONS, **kw))
        self.bn3 = nn.BatchNorm2d(self.head_dim, device=like.device)
        self.bn1 = nn.BatchNorm2d(self.head_dim, device=like.device)

    # -- gates ------------------------------------------------------------------------------------
    def attn_indicators(self) -> torch.Tensor:
        """(3,) nested indicators (i1, i2, i3): sampled in training, fixed in evaluation."""
        return nested(gate_values(self.attn_thresholds, self.training))

    def mlp_gates(self) -> torch.Tensor:
        """(hidden,) unit gates: sampled in training, fixed in evaluation."""
        return gate_values(self.mlp_thresholds, self.training)

    def choice(self) -> str:
        """The attention choice the thresholds fix now: msa, conv3, conv1 or skip."""
        return choice(nested((torch.sigmoid(self.attn_thresholds) > 0.5).float(), slow_down=False))

    def kept_units(self) -> torch.Tensor:
        """Indices of the MLP hidden units the thresholds keep now (sorted, int64)."""
        return torch.nonzero(torch.sigmoid(self.mlp_thresholds.detach()) > 0.5).flatten()

    def flops_indicators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The FLOPs loss's (3,) nested attention indicators and (hidden,) unit indicators: the current
        architecture (``sigmoid(theta) > 0.5``) with straight-through gradients."""
        att = torch.cumprod(threshold_ste(torch.sigmoid(self.attn_thresholds)), dim=0)
        return att, threshold_ste(torch.sigmoid(self.mlp_thresholds))

    # -- paths ------------------------------------------------------------------------------------
    def msa(self, y: torch.Tensor) -> torch.Tensor:
        """SAM's attention on ``y`` (B, H, W, C), on windows for a windowed block."""
        if self.window_size <= 0:
            return self.attn(y)
        h, w = y.shape[1], y.shape[2]
        windows, pad_hw = window_partition(y, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, pad_hw, (h, w))

    def conv(self, y: torch.Tensor, kernel: int) -> torch.Tensor:
        """The derived ``kernel`` x ``kernel`` bottleneck conv (3 or 1) on the whole grid ``y`` (B, H, W, C)."""
        v_w, v_b, o_w, o_b = value_and_proj(self.attn)
        weight, bias, expand = derive_conv(v_w, v_b, o_w, head_mixing(self.head_probs, self.alpha), kernel)
        return bottleneck(y, weight, bias, self.bn3 if kernel == 3 else self.bn1, expand, o_b)

    def mixer(self, y: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
        """The gated sum of the attention paths for indicators ``ind`` (3,)."""
        out = torch.zeros_like(y)
        for weight, path in zip(mixer_weights(ind), (self.msa, lambda t: self.conv(t, 3), lambda t: self.conv(t, 1))):
            if self.training or float(weight) != 0.0:
                out = out + weight.to(y.dtype) * path(y)
        return out

    def gated_mlp(self, y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``lin2(gates * act(lin1(y)))``, without ``lin2``'s bias when every gate is off."""
        out = self.mlp.lin2(self.mlp.act(self.mlp.lin1(y)) * gates.to(y.dtype))
        bias = effective_bias(self.mlp.lin2)
        if bias is None:
            return out
        none_kept = (gates.detach().sum() == 0).to(out.dtype)
        return out - none_kept * bias.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), self.attn_indicators())
        return x + self.gated_mlp(self.norm2(x), self.mlp_gates())

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, heads={self.num_heads}, hidden={self.hidden}, alpha={self.alpha}"
