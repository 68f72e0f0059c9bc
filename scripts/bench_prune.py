#!/usr/bin/env python
"""Inference speed of an SPViT-pruned SAM encoder against the dense one, on this machine's CPU.

ViT-B at ``--img-size`` (1024) with random weights (speed does not depend on them). The pruned
architecture is fixed by hand to land near ``--target`` GMACs the way SPViT's searches do on SAM: the
global-attention blocks (the costliest: attention over all 4096 tokens) become 3x3 bottleneck convs
and every block keeps ``--mlp-keep`` of its MLP units. Both encoders run the same attention
implementation (``sdpa``) for the remaining MSA blocks. Dense and pruned are timed in interleaved
rounds (one image per forward, ``torch.inference_mode``), medians reported; the measured speed-up is
compared with the FLOPs ratio (goal: speed-up >= 0.8 x FLOPs ratio).

The measurement runs in a child process with an address-space limit (``--max-gb``) so that it fails
instead of taking a shared machine's memory.

    OMP_NUM_THREADS=1 python scripts/bench_prune.py --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def architecture(encoder, mlp_keep: float, convert: list[int]) -> dict:
    from samft.prune.rebuild import FORMAT, block_entry

    blocks = []
    for i, blk in enumerate(encoder.blocks):
        hidden = blk.mlp.lin1.out_features
        blocks.append(block_entry("conv3" if i in convert else "msa", list(range(int(round(hidden * mlp_keep))))))
    return {"format": FORMAT, "blocks": blocks}


def measure(args: argparse.Namespace) -> dict:
    import torch

    from samft.config import config_from_dict
    from samft.model import build_model
    from samft.prune.flops import encoder_block_flops, gmacs
    from samft.prune.rebuild import build_pruned_encoder, summary

    limit = int(args.max_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    cfg = config_from_dict({"model": {"type": args.model, "img_size": args.img_size, "attention": "sdpa"},
                            "peft": {"method": "decoder_only"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        dense = build_model(cfg).model.image_encoder.eval()
    convert = [i for i, b in enumerate(dense.blocks) if b.window_size == 0]
    arch = architecture(dense, args.mlp_keep, convert)
    pruned = build_pruned_encoder(copy.deepcopy(dense), arch).eval()
    g_dense = gmacs(encoder_block_flops(dense, args.img_size)["total"])
    g_pruned = gmacs(encoder_block_flops(pruned, args.img_size)["total"])
    x = torch.randn(1, 3, args.img_size, args.img_size)
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, enc in (("dense", dense), ("pruned", pruned)):
                t0 = time.perf_counter()
                enc(x)
                if r:
                    times[name].append(time.perf_counter() - t0)
    return {"arch": summary(arch), "gmacs_dense": g_dense, "gmacs_pruned": g_pruned, "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--img-size", type=int, default=1024)
    ap.add_argument("--mlp-keep", type=float, default=0.75, help="fraction of MLP units every block keeps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=8.0, help="address-space limit of the measuring process")
    args = ap.parse_args()
    with mp.get_context("spawn").Pool(1) as pool:
        res = pool.apply(measure, (args,))
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    flops_ratio = res["gmacs_dense"] / res["gmacs_pruned"]
    speedup = med["dense"] / med["pruned"]
    print(f"{args.model} at {args.img_size}px, {args.threads} thread(s), {args.rounds} interleaved rounds (medians)")
    print(f"pruned architecture: {res['arch']}")
    for name in ("dense", "pruned"):
        times = ", ".join(f"{t:.2f}" for t in res["times"][name])
        print(f"{name:7s} {res['gmacs_' + name]:7.1f} GMACs  {med[name]:7.2f} s/image  {1 / med[name]:.4f} images/s  "
              f"(rounds: {times} s)")
    print(f"FLOPs ratio {flops_ratio:.3f}  measured speed-up {speedup:.3f}  = {speedup / flops_ratio:.2f} x the FLOPs "
          f"ratio (goal >= 0.8): {'met' if speedup >= 0.8 * flops_ratio else 'NOT met'}")


if __name__ == "__main__":
    main()
