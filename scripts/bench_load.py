"""Loading an official-size SAM from a checkpoint: the build without random initialisation (samft) against the
build that fills every weight first and then loads (the plain path), measured in one run, alternating.

    python scripts/bench_load.py [--type vit_b] [--rounds 5] [--threads 1]

Writes a checkpoint of the official format (a flat state dict of random weights: the timing does not depend
on the values) to a temporary folder, then times ``samft.model.sam.build_sam`` with ``model.checkpoint`` set,
each way, and checks the two models are equal. Prints the medians and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import warnings

    import torch

    import samft.model.sam as sam_module
    from samft.config import ModelConfig

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="model.checkpoint is null")
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    path = tmp / f"sam_{args.type}.pth"
    torch.save(sam_module.build_sam(ModelConfig(type=args.type, img_size=1024)).state_dict(), path)
    cfg = ModelConfig(type=args.type, img_size=1024, checkpoint=str(path))
    unfilled = sam_module.weights_left_unfilled
    times: dict[str, list[float]] = {"plain": [], "samft": []}
    models = {}
    for _ in range(args.rounds):
        for name in ("plain", "samft"):
            sam_module.weights_left_unfilled = contextlib.nullcontext if name == "plain" else unfilled
            t0 = time.perf_counter()
            models[name] = sam_module.build_sam(cfg)
            times[name].append(time.perf_counter() - t0)
    sam_module.weights_left_unfilled = unfilled
    same = all(torch.equal(a, b) for a, b in zip(models["plain"].state_dict().values(),
                                                  models["samft"].state_dict().values()))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SAM {args.type} from a {path.stat().st_size / 1e6:.0f} MB checkpoint, {args.threads} thread(s), "
          f"median of {args.rounds}: plain (initialise, then load) {med['plain']:.2f} s, samft (load only) "
          f"{med['samft']:.2f} s, {med['plain'] / med['samft']:.2f}x; models equal: {same}")
    path.unlink()


if __name__ == "__main__":
    main()
