"""Loading an official-size SAM from its checkpoint: samft's path against the plain one, measured in one run,
alternating.

    python scripts/bench_load.py [--type vit_b] [--rounds 5] [--threads 1]

- plain: ``sam_model_registry[type](checkpoint=None)`` (every weight randomly initialised), ``torch.load`` of the
  file (read into memory), ``load_state_dict`` (copied into the model): what samft did before;
- samft: ``samft.model.sam.build_sam`` with ``model.checkpoint`` set: the structure built without filling its
  weights, the file read and its tensors assigned to the model (no second copy).

Both then read every weight once (a sum over the state dict: what the first forward pass does). Writes a checkpoint of the official format (a flat state dict of random weights: the
timing does not depend on the values) to a temporary folder (the page cache holds it for both after round
one), checks the two models are equal, and prints the medians, the ratio and each path's peak memory growth.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def touch(model) -> float:
    """Read every weight once (as a first forward pass does)."""
    return sum(float(t.float().sum()) for t in model.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from segment_anything.build_sam import sam_model_registry

    from samft.config import ModelConfig
    from samft.model.sam import build_sam

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="model.checkpoint is null")
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    path = tmp / f"sam_{args.type}.pth"
    torch.save(build_sam(ModelConfig(type=args.type, img_size=1024)).state_dict(), path)
    cfg = ModelConfig(type=args.type, img_size=1024, checkpoint=str(path))

    def plain():
        sam = sam_model_registry[args.type](checkpoint=None)
        sam.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return sam

    paths = {"plain": plain, "samft": lambda: build_sam(cfg)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    sums = {}
    for _ in range(args.rounds):
        for name, build in paths.items():
            t0 = time.perf_counter()
            sums[name] = touch(build())
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SAM {args.type} from a {path.stat().st_size / 1e6:.0f} MB checkpoint, {args.threads} thread(s), "
          f"median of {args.rounds} (build, load, read every weight once): plain {med['plain']:.2f} s, samft "
          f"{med['samft']:.2f} s, {med['plain'] / med['samft']:.2f}x; same weights: {sums['plain'] == sums['samft']}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    path.unlink()


if __name__ == "__main__":
    main()
