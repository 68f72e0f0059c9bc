"""The structure loss's boundary weights: the separable 31-pool (samft) against the plain 2-D 31x31 pool it
replaces, measured in one run on the same masks; prints medians and the ratio, and the largest difference.

    python scripts/bench_losses.py [--sizes 192 256 1024] [--batch 8] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from samft.tasks.losses import boundary_weights


def plain(target: torch.Tensor) -> torch.Tensor:
    return 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)


def median_ms(fn, x: torch.Tensor, rounds: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[192, 256, 1024])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}, batch {args.batch}, median of {args.rounds} rounds")
    print("size | plain 2-D pool ms | separable ms | speed-up | max |diff|")
    for size in args.sizes:
        x = (torch.rand(args.batch, 1, size, size) > 0.5).float()
        a, b = median_ms(plain, x, args.rounds), median_ms(boundary_weights, x, args.rounds)
        diff = float((plain(x) - boundary_weights(x)).abs().max())
        print(f"{size} | {a:.1f} | {b:.1f} | {a / b:.1f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
