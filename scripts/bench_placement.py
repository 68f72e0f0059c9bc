#!/usr/bin/env python
"""Training step time and activation memory of a PEFT method on the last K encoder blocks against all blocks.

Both models (the same SAM, random base weights: speed and memory do not depend on them) are built in this
process and stepped in turn (forward, loss, backward, AdamW), so both see the same machine load; after a warm-up
step each, the median of ``--steps`` steps is printed with the ratio against ``peft.blocks=all`` (the plain
placement). Activation memory is what autograd keeps for the backward pass: the bytes of the distinct tensors
packed by ``torch.autograd.graph.saved_tensors_hooks`` in one step (exact on any device); on CUDA the peak
allocated memory of a step is printed too.

    python scripts/bench_placement.py                                 # LoRA, vit_b, 1024 px, batch 1, late:4
    python scripts/bench_placement.py --img-size 512 --steps 3        # a slow CPU
    python scripts/bench_placement.py --method conv_lora --blocks late:2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samft.config import config_from_dict  # noqa: E402
from samft.model import build_model  # noqa: E402


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while open, the model's own weights and buffers
    left out (activation memory)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.own:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def build(args: argparse.Namespace, blocks: str) -> torch.nn.Module:
    cfg = config_from_dict({"model": {"type": args.model, "img_size": args.img_size},
                            "peft": {"method": args.method, "blocks": blocks},
                            "train": {"grad_checkpointing": args.checkpointing}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random base weights: the warning says so
        model = build_model(cfg).model.to(args.device).train()
    model.grad_checkpointing = args.checkpointing
    return model


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, device: str) -> tuple[float, int, int]:
    """One training step: (seconds, activation bytes, peak CUDA bytes or 0)."""
    saved = SavedBytes(model)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = model(images)
        loss = out.masks.float().square().mean() + out.aux_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, saved.total, torch.cuda.max_memory_allocated() if device == "cuda" else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--blocks", default="late:4", help="the placement measured against peft.blocks=all")
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per placement (after one warm-up)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    placements = ["all", args.blocks]
    models = {b: build(args, b) for b in placements}
    opts = {b: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for b, m in models.items()}
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    runs: dict[str, list] = {b: [] for b in placements}
    for i in range(args.steps + 1):
        for b in placements:
            result = step(models[b], opts[b], images, args.device)
            if i:  # the first step of each is the warm-up
                runs[b].append(result)
    rows = {}
    for b in placements:
        seconds, saved, peak = (statistics.median(r[k] for r in runs[b]) for k in range(3))
        rows[b] = {"step_s": seconds, "activation_mib": saved / 2**20, "cuda_peak_mib": peak / 2**20}
    base = rows["all"]
    for b in placements:
        rows[b]["speedup"] = base["step_s"] / rows[b]["step_s"]
        rows[b]["activation_ratio"] = rows[b]["activation_mib"] / base["activation_mib"]
        rows[b]["cuda_peak_ratio"] = rows[b]["cuda_peak_mib"] / base["cuda_peak_mib"] if base["cuda_peak_mib"] else None
    head = (f"{args.method} on {args.model} @ {args.img_size}px, batch {args.batch_size}, {args.device}, "
            f"{torch.get_num_threads()} threads, checkpointing {args.checkpointing}: median of {args.steps} steps")
    if args.json:
        print(json.dumps({"setup": head, "rows": rows}, indent=2))
        return
    print(head)
    print(f"{'peft.blocks':12s} {'step s':>8s} {'speed-up':>9s} {'activ. MiB':>11s} {'ratio':>6s} {'CUDA peak MiB':>14s}")
    for b, r in rows.items():
        peak = f"{r['cuda_peak_mib']:14.0f}" if r["cuda_peak_mib"] else f"{'-':>14s}"
        print(f"{b:12s} {r['step_s']:8.2f} {r['speedup']:8.2f}x {r['activation_mib']:11.0f} "
              f"{r['activation_ratio']:6.2f} {peak}")


if __name__ == "__main__":
    main()
