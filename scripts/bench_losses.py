"""The structure loss's boundary weights: samft's running-sum box filter against the plain 2-D 31x31 pool and
the two 1-D pools it replaced, measured in one run on the same masks; prints medians, the ratios to the plain
pool, and the largest difference. ``--step`` also times whole training steps of the demo config
(configs/demo.yaml: tiny SAM, 192 px, batch 8, Conv-LoRA) with the plain pool and samft's, alternating, in one
process: median CPU time per step and the ratio.

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


def separable(target: torch.Tensor) -> torch.Tensor:
    """The previous samft path: a 31 x 1 pool then a 1 x 31 pool."""
    x = F.avg_pool2d(target, (31, 1), stride=1, padding=(15, 0))
    return 1 + 5 * torch.abs(F.avg_pool2d(x, (1, 31), stride=1, padding=(0, 15)) - target)


def median_ms(fn, x: torch.Tensor, rounds: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def step_times(rounds: int) -> None:
    """Median CPU seconds of one demo training step with the plain pool and samft's weights (alternating)."""
    import sys

    import samft.tasks.losses as losses

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _demo_step import demo_step

    run_step, _ = demo_step(total_steps=2 * rounds + 4)
    fast = losses.boundary_weights
    times: dict[str, list[float]] = {"plain": [], "samft": []}
    for i in range(2 * rounds + 4):
        name = ("plain", "samft")[i % 2]
        losses.boundary_weights = plain if name == "plain" else fast
        t0 = time.process_time()
        run_step()
        if i >= 4:  # warm-up
            times[name].append(time.process_time() - t0)
    losses.boundary_weights = fast
    a, b_ = statistics.median(times["plain"]), statistics.median(times["samft"])
    print(f"demo training step (CPU time, median of {rounds}): plain pool {a:.3f} s, samft {b_:.3f} s, "
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
    print("size | plain 2-D pool ms | two 1-D pools ms (x plain) | running sums ms (x plain) | max |diff|")
    for size in args.sizes:
        x = (torch.rand(args.batch, 1, size, size) > 0.5).float()
        a = median_ms(plain, x, args.rounds)
        s = median_ms(separable, x, args.rounds)
        b = median_ms(boundary_weights, x, args.rounds)
        diff = float((plain(x) - boundary_weights(x)).abs().max())
        print(f"{size} | {a:.1f} | {s:.1f} ({a / s:.1f}x) | {b:.1f} ({a / b:.1f}x) | {diff:.1e}")
    if args.step:
        step_times(args.rounds)


if __name__ == "__main__":
    main()
