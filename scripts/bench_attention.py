#!/usr/bin/env python
"""Time SAM's encoder attention alone: segment_anything's eager ``Attention`` against samft's SDPA path.

For each model size, one windowed block (14 x 14 windows, as SAM pads the token grid) and one global
block at ``--img-size``, forward + backward (gradients for the input and a LoRA on ``qkv``, as in
training), median of ``--steps`` after warm-up; peak memory on CUDA; the largest output difference
between the two paths. ``--backend`` forces one fused kernel (to check that it accepts the
relative-position mask and its gradient).

    python scripts/bench_attention.py --models vit_b,vit_l,vit_h --img-size 1024 --precision bf16
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything.modeling.image_encoder import Attention  # noqa: E402

from samft.model.attention import convert_attention  # noqa: E402
from samft.peft.lora import LoRALinear  # noqa: E402

SIZES = {"vit_b": (768, 12), "vit_l": (1024, 16), "vit_h": (1280, 16), "tiny": (64, 2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench(attn, x, steps, warmup, device, dtype):
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = None
    for i in range(warmup + steps):
        xi = x.detach().requires_grad_(True)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = attn(xi)
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 1024**3 if cuda else float("nan")
    return statistics.median(times), peak, out.detach().float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma list: vit_b, vit_l, vit_h, tiny")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--precision", default=None, choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "efficient", "flash", "cudnn", "math"))
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    models = (args.models or ("vit_b,vit_l,vit_h" if cuda else "vit_b")).split(",")
    img = args.img_size or (1024 if cuda else 512)
    dtype = DTYPES[args.precision or ("bf16" if cuda else "fp32")]
    ctx = None
    if args.backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.backend]
    grid = img // 16
    padded = math.ceil(grid / 14) * 14
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'CPU'}; {dtype}; img {img} (tokens {grid}x{grid}); "
          f"batch {args.batch_size}; forward+backward, median of {args.steps}; backend {args.backend}")
    print("| model | block | tokens x windows | eager ms | sdpa ms | speed-up | eager peak GB | sdpa peak GB | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models:
        dim, heads = SIZES[name]
        for kind, size, windows in (("windowed", 14, args.batch_size * (padded // 14) ** 2),
                                    ("global", grid, args.batch_size)):
            torch.manual_seed(0)
            eager = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(size, size))
            eager.requires_grad_(False)
            eager.qkv = LoRALinear(eager.qkv, rank=4, alpha=8.0)
            eager = eager.to(device)
            fast = convert_attention(copy.deepcopy(eager), "sdpa")
            x = torch.randn(windows, size, size, dim, device=device)
            t_e, m_e, out_e = bench(eager, x, args.steps, args.warmup, device, dtype)
            if ctx is not None:
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel([ctx]):
                    t_f, m_f, out_f = bench(fast, x, args.steps, args.warmup, device, dtype)
            else:
                t_f, m_f, out_f = bench(fast, x, args.steps, args.warmup, device, dtype)
            diff = (out_f - out_e).abs().max().item()
            print(f"| {name} | {kind} | {size * size} x {windows} | {1000 * t_e:.2f} | {1000 * t_f:.2f} | "
                  f"{t_e / t_f:.2f} | {m_e:.3f} | {m_f:.3f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
