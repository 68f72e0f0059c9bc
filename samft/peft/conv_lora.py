"""``conv_lora``: Conv-LoRA (Zhong et al., ICLR 2024, arXiv 2401.17868).

``h = W0 x + s * Wd (z + E_g(z))`` with ``z = We x`` and ``s = alpha / r``.

``We`` (r x in) is kaiming-uniform and ``Wd`` (out x r) zero, so the layer starts as the frozen base
layer. ``E_g`` is a mixture of convolutional experts on the low-rank feature map: expert ``i`` upsamples
``z`` bicubically by its scale, applies a 3x3 convolution r -> r (bias zero-initialised) and GELU, and
resizes back. A noisy top-k gate (Shazeer et al. 2017) on the globally average-pooled ``z`` picks the
expert(s) of each sample; its balance loss ``coef * (cv^2(importance) + cv^2(load))`` is added, named
``balance``, to the open aux-loss sink (:func:`samft.tasks.terms.aux_sink`, opened by the model around its
forward pass); outside a sink it is not computed.

SAM's windowed blocks call ``qkv`` on (B * windows, 14, 14, C) tensors, so the convolution and the
gate act per window; global blocks see the whole map, as in the reference implementation. As in the
reference, the chosen experts' outputs are summed without multiplying by the gate
(``gate_scales_output=False``): with top-1 the gate of the chosen expert is exactly 1, so only the
balance loss trains the router. Unlike the reference, experts are combined with a plain sum (no
``exp``/``log`` round trip, which overflows in fp16) and samples are dispatched to experts in groups.
Conv-LoRA cannot be merged into ``W0``: its branch is non-linear. For ONNX export (``export_friendly``
in eval mode) :meth:`ConvLoRALinear.mixture_gathered` dispatches without a host sync: for each expert the
samples that chose it are found with ``nonzero`` (ONNX ``NonZero``, a data-dependent length), gathered,
run through that expert (an empty batch when none chose it) and added back with ``index_add``: the traced
graph computes only the chosen experts, as the eager path does. :meth:`ConvLoRALinear.mixture_dense`
(every expert on every sample, each output weighted by the sample's choice: ``experts`` times the expert
compute) is the plain path it is tested equal to.

``impl=reference`` restates the reference's own path (AutoGluon's ``SparseDispatcher``: ``nonzero`` /
``split`` dispatch, expert outputs combined as ``log(index_add(exp(y)))`` in float32). For top-1 it is the
same function as the default ``grouped`` path (tested equal); it exists only as the baseline that
``scripts/bench_train.py`` measures against. In fp16 its ``exp`` overflows to ``inf`` once an expert
output exceeds about 11.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from samft.config.peft.conv_lora import ConvLoRAConfig
from samft.peft.inject import AdapterLayer, linear_targets, replace_modules
from samft.peft.lora import init_low_rank, lora_scaling
from samft.peft.quantize import float_like
from samft.peft.registry import register
from samft.tasks.terms import active_aux_sink


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean^2); 0 for a single value."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating on the global average of a (N, r, H, W) map.

    Returns ``(indices (N, k), gates (N, k), balance_loss)``; the balance loss is None with
    ``balance=False`` (not computed). ``w_gate`` and ``w_noise`` start at zero, as in the reference: the
    first choices are made by the noise alone.
    """

    def __init__(self, dim: int, experts: int, top_k: int = 1, noisy: bool = True, noise_eps: float = 1e-2,
                 coef: float = 1e-2) -> None:
        super().__init__()
        self.experts, self.top_k, self.noisy, self.noise_eps, self.coef = experts, top_k, noisy, noise_eps, coef
        self.w_gate = nn.Parameter(torch.zeros(dim, experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, experts))

    def forward(self, z: torch.Tensor, balance: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        pooled = z.float().mean(dim=(2, 3))
        clean = pooled @ self.w_gate.float()
        noisy = self.noisy and self.training
        if noisy:
            std = F.softplus(pooled @ self.w_noise.float()) + self.noise_eps
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        k = self.top_k
        top_vals, top_idx = logits.topk(min(k + 1, self.experts), dim=1)
        idx = top_idx[:, :k]
        gate_k = torch.softmax(top_vals[:, :k], dim=1)
        if not balance:
            return idx, gate_k, None
        gates = torch.zeros_like(logits).scatter(1, idx, gate_k)
        if noisy and k < self.experts:
            load = self._prob_in_top_k(clean, logits, std, top_vals).sum(0)
        else:
            load = (gates > 0).sum(0).float()
        loss = self.coef * (cv_squared(gates.sum(0)) + cv_squared(load))
        return idx, gate_k, loss

    def _prob_in_top_k(self, clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor,
                       top_vals: torch.Tensor) -> torch.Tensor:
        """P(expert in the top k | the noise of the others), differentiable in clean and std."""
        k = self.top_k
        threshold_if_in = top_vals[:, k : k + 1]  # the (k+1)-th value: what an expert must beat to stay in
        threshold_if_out = top_vals[:, k - 1 : k]  # the k-th value: what an outside expert must beat
        is_in = noisy > threshold_if_in
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / std)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / std)
        return torch.where(is_in, prob_if_in, prob_if_out)


class ConvLoRALinear(AdapterLayer):
    """Conv-LoRA around a frozen ``nn.Linear``.

    Input (N, H, W, in) — SAM's attention layout — or (N, L, in) with a square L; output (..., out).
    """

    aux_name = "balance"  # the experts' balance loss, weighted by loss.aux.balance

    # data-dependent group sizes (and the aux-loss sink, a context variable): torch.compile (train.compile)
    # leaves these to eager, the rest compiles
    eager_methods = ("mix", "mixture", "mixture_reference", "mixture_gathered")

    def __init__(self, base_layer: nn.Linear, cfg: ConvLoRAConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        r = cfg.rank
        self.rank = r
        self.scaling = lora_scaling(cfg.alpha, r, cfg.variant)  # rslora: alpha / sqrt(r)
        self.scales = cfg.expert_scales()
        self.gate_scales_output = cfg.gate_scales_output
        like = float_like(base_layer)  # a quantised base (model.quantize): its compute dtype
        self.lora_A, self.lora_B = init_low_rank(base_layer.in_features, base_layer.out_features, r, like)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.experts = nn.ModuleList()
        for _ in self.scales:
            conv = nn.Conv2d(r, r, kernel_size=3, padding=1, bias=True,
                             device=like.device, dtype=like.dtype)
            nn.init.zeros_(conv.bias)
            self.experts.append(conv)
        self.gate = NoisyTopKGate(r, len(self.scales), cfg.top_k, cfg.noisy_gating, cfg.noise_eps, cfg.balance_coef)
        self.gate.to(device=like.device)
        self.impl = cfg.impl

    def expert(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """Expert ``i`` on (n, r, H, W): upsample by its scale, conv 3x3, GELU, resize back."""
        h, w = z.shape[-2:]
        scale = self.scales[i]
        if scale != 1:
            z = F.interpolate(z, scale_factor=scale, mode="bicubic")
        z = F.gelu(self.experts[i](z))
        if scale != 1:
            z = F.interpolate(z, size=(h, w), mode="bicubic")
        return z

    def mixture(self, z: torch.Tensor, balance: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``E_g(z)`` for z (N, r, H, W), grouped by expert; returns (output, balance loss)."""
        idx, gates, loss = self.gate(z, balance)
        n, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.scales)).tolist()  # one host sync per layer
        rows_sorted = order // k
        out = None
        start = 0
        for i, count in enumerate(counts):
            if count == 0:
                continue
            pos = order[start : start + count]
            rows = rows_sorted[start : start + count]
            start += count
            y = self.expert(i, z.index_select(0, rows))
            if self.gate_scales_output:
                y = y * gates.reshape(-1)[pos].to(y.dtype).view(-1, 1, 1, 1)
            if out is None:
                out = torch.zeros(z.shape, dtype=y.dtype, device=z.device)
            out = out.index_add(0, rows, y)
        return out, loss

    def mixture_dense(self, z: torch.Tensor, balance: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``E_g(z)`` without data-dependent dispatch, for export: every expert runs on every sample and
        its output is weighted by the sample's (0/1, or gate with ``gate_scales_output``) choice.
        Same function as :meth:`mixture` (tested equal); ``experts`` times its expert compute."""
        idx, gates, loss = self.gate(z, balance)
        chosen = gates.to(z.dtype) if self.gate_scales_output else torch.ones_like(gates, dtype=z.dtype)
        weights = torch.zeros(z.shape[0], len(self.scales), dtype=z.dtype, device=z.device).scatter(1, idx, chosen)
        out = torch.zeros_like(z)
        for i in range(len(self.scales)):
            out = out + self.expert(i, z) * weights[:, i].view(-1, 1, 1, 1)
        return out, loss

    def mixture_gathered(self, z: torch.Tensor, balance: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``E_g(z)`` for export: per expert, the rows that chose it (``nonzero``: no host sync, so it traces to
        ONNX ``NonZero``/``Gather``/``ScatterElements``), that expert on them, added back. Only the chosen
        experts' work, as :meth:`mixture`; the same function as :meth:`mixture_dense` (tested equal)."""
        idx, gates, loss = self.gate(z, balance)
        out = torch.zeros_like(z)
        for i in range(len(self.scales)):
            hit = idx == i  # (N, k): a sample chooses an expert at most once
            rows = hit.any(1).nonzero().squeeze(1)
            y = self.expert(i, z.index_select(0, rows))
            if self.gate_scales_output:
                y = y * (gates * hit).sum(1).index_select(0, rows).to(y.dtype).view(-1, 1, 1, 1)
            out = out.index_add(0, rows, y.to(out.dtype))
        return out, loss

    def mixture_reference(self, z: torch.Tensor, balance: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``E_g(z)`` the way the reference computes it (baseline only; top-1; see the module docstring)."""
        idx, gate_k, loss = self.gate(z, balance)
        experts = len(self.scales)
        gates = torch.zeros(z.shape[0], experts, dtype=gate_k.dtype, device=z.device).scatter(1, idx, gate_k)
        nonzero = torch.nonzero(gates)  # (M, 2): (sample, expert)
        sorted_experts, order = nonzero.sort(0)
        expert_index = sorted_experts[:, 1:2]
        batch_index = nonzero[order[:, 1], 0]
        part_sizes = (gates > 0).sum(0).tolist()
        nonzero_gates = torch.gather(gates[batch_index], 1, expert_index)
        inputs = torch.split(z[batch_index], part_sizes, dim=0)
        outputs = [self.expert(i, inputs[i]) for i in range(experts) if part_sizes[i] > 0]
        stitched = torch.cat(outputs, 0).exp()
        if self.gate_scales_output:
            stitched = stitched * nonzero_gates.to(stitched.dtype)[..., None, None]
        combined = torch.zeros(z.shape[0], *outputs[-1].shape[1:], device=z.device)
        combined = combined.index_add(0, batch_index, stitched.float())
        combined[combined == 0] = torch.finfo(torch.float64).eps
        return combined.log(), loss

    def mix(self, z_map: torch.Tensor) -> torch.Tensor:
        """``E_g(z)`` by the path in use; the balance loss goes to the open aux-loss sink (none: not computed)."""
        if self.export_friendly and not self.training:
            mixture = self.mixture_gathered
        else:
            mixture = self.mixture_reference if self.impl == "reference" else self.mixture
        sink = active_aux_sink()
        mixed, loss = mixture(z_map, sink is not None)
        if sink is not None:
            sink.add(self.aux_name, loss)
        return mixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.lora_A)
        if z.dim() == 4:
            z_map = z.permute(0, 3, 1, 2)
        elif z.dim() == 3:
            n, length, r = z.shape
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"Conv-LoRA needs a square token grid, got {length} tokens")
            z_map = z.transpose(1, 2).reshape(n, r, side, side)
        else:
            raise ValueError(f"Conv-LoRA expects (N, H, W, C) or (N, L, C) input, got shape {tuple(x.shape)}")
        mixed = self.mix(z_map)
        if z.dim() == 4:
            mixed = mixed.permute(0, 2, 3, 1)
        else:
            mixed = mixed.flatten(2).transpose(1, 2)
        update = F.linear(z + mixed.to(z.dtype), self.lora_B)
        return self.base_layer(x) + update * self.scaling


@register(
    "conv_lora",
    ConvLoRAConfig,
    help="Conv-LoRA: LoRA with a mixture of multi-scale convolutional experts (the paper's method)",
    unused_params=True,
)
def apply(encoder: nn.Module, cfg: ConvLoRAConfig) -> list[str]:
    return replace_modules(
        encoder,
        linear_targets(cfg.targets),
        lambda m: ConvLoRALinear(m, cfg),
        "conv_lora",
        f"targets {cfg.targets}",
    )
