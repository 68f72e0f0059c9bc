#!/usr/bin/env python
"""Prune a tiny SAM trained on ../shared/data/em-cells: metrics of the run, of the pruned model before
fine-tuning and after it, with the encoder GMACs (numbers for docs/pruning.md).

Trains a run with ``configs/compare_em_cells.yaml`` (``--method``, default lora), then
``samft.engine.train.prune.prune_run`` to ``--target`` x the dense GMACs. The tiny SAM has random frozen weights:
this exercises the pipeline on real images, it does not measure pruning a pretrained SAM.

    OMP_NUM_THREADS=1 python scripts/prune_em_cells.py --workdir runs/prune_em_cells
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--target", type=float, default=0.7, help="target as a fraction of the dense encoder's GMACs")
    ap.add_argument("--search-steps", type=int, default=100)
    ap.add_argument("--arch-lr", type=float, default=0.05)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--data", type=Path, default=None, help="the em-cells folder (default: ../shared/data/em-cells)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "prune_em_cells")
    args = ap.parse_args()

    from samft.config import load_config
    from samft.engine.train.loop import train
    from samft.prune.rebuild import summary
    from samft.engine.train.prune import PruneArgs, prune_run

    data = args.data or next((p for p in (ROOT.parent / "shared" / "data" / "em-cells",
                                          ROOT.parent.parent / "shared" / "data" / "em-cells") if p.is_dir()), None)
    if data is None:
        sys.exit("em-cells not found: pass --data PATH")
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    cfg = load_config(ROOT / "configs" / "compare_em_cells.yaml",
                      [f"peft.method={args.method}", f"output.dir={args.workdir / 'run'}", "train.progress=false",
                       f"data.root={data}"])
    run = train(cfg, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from samft.engine.artifacts.loading import load_run
        from samft.prune.flops import encoder_block_flops, gmacs

        model = load_run(run, __import__("torch").device("cpu")).model
        dense = gmacs(encoder_block_flops(model.image_encoder, model.img_size)["total"])
    report = prune_run(PruneArgs(run, args.target * dense, search_steps=args.search_steps,
                                 finetune_epochs=args.finetune_epochs, out_dir=args.workdir / "pruned",
                                 arch_lr=args.arch_lr))
    print(f"architecture: {summary(report.arch)}")
    print(f"GMACs dense {report.dense_gmacs:.4f} target {report.target_gmacs:.4f} pruned {report.pruned_gmacs:.4f} "
          f"(reached: {report.reached})")
    print(json.dumps(report.metrics, indent=1))


if __name__ == "__main__":
    main()
