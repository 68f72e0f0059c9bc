#!/usr/bin/env python
"""Extra cost of SLIP's SSL loss per training step, against the plain step measured in the same run.

A step is: labelled forward (``--batch-size`` images) + a mask BCE + backward + AdamW, as the training
loop does; the SSL step adds two views of ``--ssl-batch-size`` unlabelled images through the encoder, the
projection head and NT-Xent. Prints the median step times of each and their ratio; random inputs, random
weights (the cost does not depend on them).

    python scripts/bench_ssl.py                                  # tiny model on CPU
    python scripts/bench_ssl.py --model vit_b --img-size 1024 --precision bf16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samft.config import config_from_dict  # noqa: E402
from samft.model import build_model  # noqa: E402
from samft.slip.ssl import SSLHead, ssl_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1],
        "out_chans": 32, "decoder_depth": 2, "decoder_mlp_dim": 64, "decoder_heads": 2}


def step_times(model, head, args, device, dtype, ssl: bool) -> list[float]:
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    s = args.img_size
    images = torch.randn(args.batch_size, 3, s, s, generator=g).to(device)
    gt = (torch.rand(args.batch_size, 1, s // 4, s // 4, generator=g) > 0.5).float().to(device)
    views = torch.randn(2, args.ssl_batch_size, 3, s, s, generator=g).to(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(images)
            loss = F.binary_cross_entropy_with_logits(out.masks.float(), gt) + out.aux_loss
            if ssl:
                loss = loss + args.weight * ssl_loss(model, head, views[0], views[1], 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, vit_b, vit_l, vit_h (random weights)")
    p.add_argument("--method", default="conv_lora")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ssl-batch-size", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--emb-dim", type=int, default=256)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--precision", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    model_cfg = {"type": args.model, "img_size": args.img_size, **({"tiny": TINY} if args.model == "tiny" else {})}
    cfg = config_from_dict({"model": model_cfg, "peft": {"method": args.method}})
    torch.manual_seed(0)
    model = build_model(cfg).model.to(device).train()
    head = SSLHead(model.feature_channels, args.mlp_dim, args.emb_dim).to(device)
    plain = step_times(model, head, args, device, dtype, ssl=False)
    with_ssl = step_times(model, head, args, device, dtype, ssl=True)
    a, b = statistics.median(plain), statistics.median(with_ssl)
    print(f"{args.model} img {args.img_size} {args.method} {args.precision} on {device}: labelled batch "
          f"{args.batch_size}, unlabelled batch {args.ssl_batch_size} x 2 views, head {args.mlp_dim}/{args.emb_dim}; "
          f"median of {args.steps} steps")
    print(f"| step | ms | ratio |\n|---|---|---|\n| plain | {a * 1e3:.1f} | 1.00 |\n"
          f"| + SSL loss | {b * 1e3:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
