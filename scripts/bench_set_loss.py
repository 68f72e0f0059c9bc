"""Memory and time of the multi-class set loss: every pixel (samft) vs Mask2Former's point sampling.

    python scripts/bench_set_loss.py [--size 1024] [--queries 100] [--classes 12] [--batch 1] [--repeats 3]

Each variant runs forward + backward of the loss alone (decoder logits at size / 4 as the model gives them,
labels at ``size``) in its own process, so its peak resident memory is its own:

- ``plain``: the logits upsampled to ``size`` (as the training loop does), BCE/Dice on every pixel;
- ``points-upsampled``: the same upsampled logits, 12,544 sampled points (AutoGluon's protocol exactly);
- ``points-lowres``: points sampled straight from the decoder's logits (no upsampling: the memory saver).

Prints the median seconds and the peak RSS above the process's baseline, and each as a ratio to ``plain``
measured in the same run. CPU only; the machine's load makes times noisy, medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("plain", "points-upsampled", "points-lowres")


def child(variant: str, size: int, queries: int, classes: int, batch: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from samft.tasks.losses import PointSampling, SetLossWeights, set_loss

    torch.manual_seed(0)
    ids = torch.randint(0, classes, (batch, size // 64, size // 64))
    ids = F.interpolate(ids[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()  # blocky labels
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        class_logits = torch.randn(batch, queries, classes + 1, requires_grad=True)
        low = torch.randn(batch, queries, size // 4, size // 4, requires_grad=True)
        t0 = time.perf_counter()
        logits = low if variant == "points-lowres" else F.interpolate(low, size=(size, size), mode="bilinear",
                                                                      align_corners=False)
        if variant == "plain":
            out = set_loss(class_logits, logits, ids, valid, 255, SetLossWeights())
        else:
            out = set_loss(class_logits, logits, ids, valid, 255, SetLossWeights(1.0, 1.0, 1.0, 0.1, 1.0, 5.0, 5.0),
                           PointSampling(12544, 3.0, 0.75), torch.Generator().manual_seed(0))
        out["loss"].backward()
        seconds.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(seconds), "peak_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit-gib", type=float, default=8.0, help="address-space limit of each child")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(child(args.child, args.size, args.queries, args.classes, args.batch, args.repeats)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                                if k != "child"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{variant}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode})")
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"set loss, forward + backward: {args.batch} x {args.queries} queries, {args.classes} classes, "
          f"labels {args.size} px, decoder logits {args.size // 4} px (CPU, median of {args.repeats})")
    base = results.get("plain")
    for variant, r in results.items():
        ratio = f"  ({r['seconds'] / base['seconds']:.2f}x time, {r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x "\
                f"memory of plain)" if base else ""
        print(f"{variant:17s} {r['seconds']:7.3f} s  peak +{r['peak_mib']:7.0f} MiB{ratio}")


if __name__ == "__main__":
    main()
