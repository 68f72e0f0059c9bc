"""The structure loss's boundary weights: the separable 31-pool (samft) against the plain 2-D 31x31 pool it
replaces, measured in one run on the same masks; prints medians and the ratio, and the largest difference.
``--step`` also times whole training steps of the demo config (configs/demo.yaml: tiny SAM, 192 px, batch 8,
Conv-LoRA) with each pool, alternating, in one process: median CPU time per step and the ratio.

    python scripts/bench_losses.py [--sizes 192 256 1024] [--batch 8] [--rounds 15] [--threads 1] [--step]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

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


def step_times(rounds: int) -> None:
    """Median CPU seconds of one demo training step with the plain and the separable pool (alternating)."""
    import sys

    import samft.tasks.losses as losses

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _demo_step import demo_step

    run_step, _ = demo_step(total_steps=2 * rounds + 4)
    fast = losses.boundary_weights
    times: dict[str, list[float]] = {"plain": [], "separable": []}
    for i in range(2 * rounds + 4):
        name = ("plain", "separable")[i % 2]
        losses.boundary_weights = plain if name == "plain" else fast
        t0 = time.process_time()
        run_step()
        if i >= 4:  # warm-up
            times[name].append(time.process_time() - t0)
    losses.boundary_weights = fast
    a, b_ = statistics.median(times["plain"]), statistics.median(times["separable"])
    print(f"demo training step (CPU time, median of {rounds}): plain pool {a:.3f} s, separable {b_:.3f} s, "
          f"speed-up {a / b_:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[192, 256, 1024])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", action="store_true", help="also time whole demo training steps with each pool")
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
    if args.step:
        step_times(args.rounds)


if __name__ == "__main__":
    main()
