"""``sam_adapter``: SAM-Adapter (Chen et al. 2023) = explicit visual prompting (Liu et al., CVPR 2023).

Two task-specific features are summed on the patch grid (width ``d = dim // scale_factor``):

- the *tuned embedding*: a Linear (dim -> d) on the frozen patch-embedding tokens;
- the *handcrafted feature*: the image's high-frequency component (2-D FFT, the centred low-frequency
  square holding ``freq_ratio`` of the spectrum masked out, inverse FFT, absolute value), embedded by
  its own patch embedding (a d-channel convolution with SAM's patch size and stride).

Before block ``i`` a prompt ``up(GELU(W_i f))`` is added to the tokens: ``W_i`` (d -> d) is per block,
``up`` (d -> dim) is shared by all blocks as in the reference implementation (``shared_up=true``) or
per block. ``up`` starts at zero, so the model starts as the frozen one.

``SemanticSAM.encode`` calls ``patch_embed(images)`` and then the blocks, so the patch embedding is
wrapped by :class:`EVPPromptGenerator` (it sees the image, computes ``f`` and keeps it for this forward
pass) and every block by :class:`EVPBlock` (adds its prompt, then runs the block). Not mergeable.
ONNX has no FFT: for export the high-pass is computed by :func:`high_frequency_matmul` (DFT matrices).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samft.config.peft.sam_adapter import SAMAdapterConfig
from samft.errors import ConfigError
from samft.peft.inject import AdapterLayer, replace_modules
from samft.peft.registry import register


def high_frequency(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """|IFFT(FFT(x) with the centred low-frequency square masked)| of (B, C, H, W) images, per channel.

    The square's side is ``2 * floor(sqrt(H * W * ratio) / 2)`` frequencies, centred after ``fftshift``
    (as in the reference implementation).
    """
    x = images.float()
    h, w = x.shape[-2:]
    half = int((h * w * ratio) ** 0.5 // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
    if half > 0:
        keep = torch.ones(h, w, device=x.device)
        keep[max(0, h // 2 - half): h // 2 + half, max(0, w // 2 - half): w // 2 + half] = 0
        spectrum = spectrum * keep
    out = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="forward").real.abs()
    return out.to(images.dtype)


def _low_pass_matrices(n: int, band: range) -> tuple[np.ndarray, np.ndarray]:
    """Real and imaginary parts of ``A = IDFT diag(1 on band) DFT`` (n, n): the band of ``fftshift``-ed
    frequency indices kept by a 1-D low-pass."""
    freqs = (np.asarray(band) - n // 2) % n  # fftshift puts frequency 0 at n // 2
    delta = np.arange(-(n - 1), n)  # A[j, m] depends on j - m only
    angle = 2 * np.pi * np.outer(delta, freqs) / n
    re, im = np.cos(angle).sum(1) / n, np.sin(angle).sum(1) / n
    index = np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1
    return re[index], im[index]


def high_frequency_matmul(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """:func:`high_frequency` without FFTs (which ONNX cannot express), for export: the centred square
    low-pass is separable, ``L x = A_h x A_w^T``, so ``Re(IFFT(FFT(x) * keep)) = x - (Re A_h x Re A_w^T
    - Im A_h x Im A_w^T)`` with constant (H, H) and (W, W) matrices. Same function (tested equal)."""
    x = images.float()
    h, w = int(x.shape[-2]), int(x.shape[-1])  # Python ints, also while tracing (the size is static)
    half = int((h * w * ratio) ** 0.5 // 2)
    if half == 0:
        return x.abs().to(images.dtype)
    rh, ih = (torch.from_numpy(m).float().to(x.device)
              for m in _low_pass_matrices(h, range(max(0, h // 2 - half), min(h, h // 2 + half))))
    rw, iw = (torch.from_numpy(m).float().to(x.device)
              for m in _low_pass_matrices(w, range(max(0, w // 2 - half), min(w, w // 2 + half))))
    low = rh @ x @ rw.T - ih @ x @ iw.T
    return (x - low).abs().to(images.dtype)


class EVPPromptGenerator(AdapterLayer):
    """Wraps SAM's ``patch_embed``: returns its tokens (B, H, W, dim) unchanged and keeps the prompt
    feature ``f = embed(tokens) + handcrafted(high_frequency(image))`` (B, H, W, d) in ``self.feature``."""

    def __init__(self, base_layer: nn.Module, d: int, freq_ratio: float, shared_up: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        proj: nn.Conv2d = base_layer.proj
        dim, like = proj.out_channels, proj.weight
        self.freq_ratio = freq_ratio
        self.embedding = nn.Linear(dim, d, device=like.device, dtype=like.dtype)
        self.handcrafted = nn.Conv2d(proj.in_channels, d, kernel_size=proj.kernel_size, stride=proj.stride,
                                     padding=proj.padding, device=like.device, dtype=like.dtype)
        self.up = zero_linear(d, dim, like) if shared_up else None
        self.feature: Optional[torch.Tensor] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.base_layer(images)
        high = high_frequency_matmul if self.export_friendly else high_frequency
        hand = self.handcrafted(high(images, self.freq_ratio)).permute(0, 2, 3, 1)
        self.feature = self.embedding(tokens) + hand
        return tokens


class EVPBlock(AdapterLayer):
    """Wraps an encoder block: ``block(x + up(GELU(W f)))`` with ``f`` from the prompt generator."""

    def __init__(self, base_layer: nn.Module, generator: EVPPromptGenerator, d: int, dim: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_generator", generator)  # registered under patch_embed, not here
        like = generator.embedding.weight
        self.mlp = nn.Linear(d, d, device=like.device, dtype=like.dtype)
        self.up = zero_linear(d, dim, like) if generator.up is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._generator.feature
        if f is None or f.shape[:3] != x.shape[:3]:
            raise RuntimeError("SAM-Adapter block called without the prompt generator's feature for this input "
                               "(run the encoder from its patch embedding)")
        up = self.up if self.up is not None else self._generator.up
        return self.base_layer(x + up(F.gelu(self.mlp(f))).to(x.dtype))


def zero_linear(d_in: int, d_out: int, like: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, device=like.device, dtype=like.dtype)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@register("sam_adapter", SAMAdapterConfig,
          help="SAM-Adapter / explicit visual prompting: high-frequency + tuned patch features prompt every block")
def apply(encoder: nn.Module, cfg: SAMAdapterConfig) -> list[str]:
    patch_embed = getattr(encoder, "patch_embed", None)
    if not isinstance(getattr(patch_embed, "proj", None), nn.Conv2d):
        raise ConfigError("PEFT method sam_adapter: no module of the image encoder matched patch_embed (a "
                          "patch embedding with a Conv2d proj)")
    dim = patch_embed.proj.out_channels
    d = dim // cfg.scale_factor
    if d < 1:
        raise ConfigError(f"peft.sam_adapter.scale_factor: {cfg.scale_factor} is larger than the encoder width {dim}")
    names = replace_modules(encoder, lambda n, m: n == "patch_embed",
                            lambda m: EVPPromptGenerator(m, d, cfg.freq_ratio, cfg.shared_up), "sam_adapter",
                            "patch_embed")
    generator = encoder.patch_embed
    blocks = replace_modules(encoder, lambda n, m: n.count(".") == 1 and n.startswith("blocks."),
                             lambda m: EVPBlock(m, generator, d, dim), "sam_adapter", "the encoder blocks")
    return names + blocks
