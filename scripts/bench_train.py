#!/usr/bin/env python
"""Time samft training steps and peak memory for a grid of configurations, side by side.

Each configuration runs in its own fresh process (clean peak memory, no compile caches shared) and
times the real training step (``samft.engine.train.loop.train_step``: forward, structure + balance
loss, backward, clipping, AdamW) on random images with random masks, after warm-up steps. It prints
one row per configuration: median step time, images/s, peak memory, the ratio of images/s against the
*plain path* measured in the same run (segment_anything's eager attention, fp32, no checkpointing, the
reference Conv-LoRA ``impl=reference``, no compile; same model, method, image size and batch), and,
with ``--peak-tflops``, the model FLOPs utilisation (MFU) from the encoder's forward FLOPs counted
once (see ``samft/prune/encoder_flops.py``).

Examples::

    # CPU, tiny model (the default there), the ladder of optimisations
    python scripts/bench_train.py
    # GPU: vit_b/l/h at 1024 px, batch 1, MFU against the H100 SXM dense bf16 peak
    python scripts/bench_train.py --models vit_b,vit_l,vit_h --img-size 1024 --batch-size 1 --peak-tflops 989
    # the model families side by side (SAM 2.1's Hiera vs SAM's ViT): one row per model, ratios against
    # the first model, encoder GMACs
    python scripts/bench_train.py --preset family --models vit_b,hiera_t,hiera_b+ --img-size 1024 --steps 3
    # a full grid: every combination of the listed values
    python scripts/bench_train.py --preset grid --models vit_b --precisions fp32,bf16 --checkpointing off,on \\
        --attention eager,sdpa --impl reference,grouped

Random base weights are used (no checkpoint is read): the speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "BENCH_RESULT "
PLAIN = {"attention": "eager", "precision": "fp32", "checkpointing": False, "impl": "reference", "compile": False}

# the ladder: the plain path, then one optimisation added at a time
LADDER = [
    {"attention": "eager", "precision": "fp32", "checkpointing": False, "impl": "reference"},
    {"attention": "eager", "precision": "fp32", "checkpointing": False, "impl": "grouped"},
    {"attention": "sdpa", "precision": "fp32", "checkpointing": False, "impl": "grouped"},
    {"attention": "sdpa", "precision": "bf16", "checkpointing": False, "impl": "grouped"},
    {"attention": "sdpa", "precision": "bf16", "checkpointing": True, "impl": "grouped"},
    {"attention": "eager", "precision": "bf16", "checkpointing": True, "impl": "reference"},
]


# ---------------------------------------------------------------------------------------------
# worker: one configuration in this process
# ---------------------------------------------------------------------------------------------


def family(model: str) -> str:
    """SAM 2.1's sizes are Hiera's (``hiera_t`` ...); the others SAM 1's."""
    return "sam2" if model.startswith("hiera") else "sam"


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def run_one(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from samft.config import config_from_dict
    from samft.engine.runtime import pick_device, resolve_precision
    from samft.engine.train.setup import build_training
    from samft.engine.train.loop import train_step
    from samft.model import encoder_gmacs

    warnings.filterwarnings("ignore", message=".*random weights.*")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = pick_device(spec["device"])
    rss_before = _peak_rss_gb()
    cfg = config_from_dict({
        "model": {"family": family(spec["model"]), "type": spec["model"], "img_size": spec["img_size"],
                  "attention": spec["attention"]},
        "peft": {"method": spec["method"], **({"conv_lora": {"impl": spec["impl"]}}
                                               if spec["method"] == "conv_lora" else {})},
        "train": {"batch_size": spec["batch_size"], "precision": spec["precision"], "device": spec["device"],
                  "grad_checkpointing": spec["checkpointing"], "compile": spec["compile"], "progress": False},
    })
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    parts = build_training(cfg, device, precision, total_steps=spec["warmup"] + spec["steps"])  # what train runs
    model = parts.model.train()
    b, s = spec["batch_size"], spec["img_size"]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(b, 3, s, s, generator=g), "mask": (torch.rand(b, s, s, generator=g) > 0.5),
             "valid_hw": torch.tensor([[s, s]] * b)}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(parts, [{"labelled": batch}])
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    warm = [step() for _ in range(spec["warmup"])]
    times = [step() for _ in range(spec["steps"])]
    median = statistics.median(times)
    result = {**spec, "precision": precision, "device": str(device), "step_s": median,
              "step_s_min": min(times), "step_s_max": max(times), "warmup_s": warm,
              "images_per_s": b / median,
              "encoder_gmacs": encoder_gmacs(cfg, model.image_encoder),
              "encoder_fwd_flops": 2e9 * encoder_gmacs(cfg, model.image_encoder),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if cuda:
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1024**3
        result["gpu"] = torch.cuda.get_device_name(device)
    else:
        result["peak_gb"] = _peak_rss_gb() - rss_before  # process peak RSS above the import baseline
        result["cpu_threads"] = torch.get_num_threads()
    result["torch"] = torch.__version__
    return result


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = run_one(spec)
    except Exception as e:  # noqa: BLE001 - reported as the row's status (OOM, unavailable compile ...)
        import torch

        kind = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        result = {**spec, "error": f"{kind}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# parent: the grid, one process per configuration, the table
# ---------------------------------------------------------------------------------------------


def _bool_list(text: str) -> list[bool]:
    values = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    return [values[v.strip().lower()] for v in text.split(",")]


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def grid(args) -> list[dict]:
    base = {"method": None, "img_size": args.img_size, "batch_size": args.batch_size, "warmup": args.warmup,
            "steps": args.steps, "device": args.device, "threads": args.threads}
    rows = []
    for model, method in itertools.product(_list(args.models), _list(args.methods)):
        if args.preset == "family":  # the default training path, the same for every model
            variants = [{"attention": "sdpa", "precision": _list(args.precisions)[0], "checkpointing": False,
                         "impl": "grouped", "compile": False}]
        elif args.preset == "ladder":
            variants = [dict(v, compile=False) for v in LADDER]
            if args.with_compile:
                variants.append({"attention": "sdpa", "precision": "bf16", "checkpointing": True,
                                 "impl": "grouped", "compile": True})
        else:
            variants = [dict(zip(("precision", "checkpointing", "attention", "impl", "compile"), combo))
                        for combo in itertools.product(_list(args.precisions), _bool_list(args.checkpointing),
                                                       _list(args.attention), _list(args.impl),
                                                       _bool_list(args.compile))]
            if PLAIN not in variants:
                variants.insert(0, dict(PLAIN))  # the ratio needs the plain path measured in this run
        for v in variants:
            if method != "conv_lora" and v["impl"] != "grouped":
                v = dict(v, impl="grouped") if v != PLAIN else v
            spec = dict(base, model=model, method=method, **v)
            if spec not in rows:
                rows.append(spec)
    return rows


def is_plain(r: dict) -> bool:
    return all(r[k] == v for k, v in PLAIN.items())


def describe(r: dict) -> str:
    parts = [r["attention"], r["precision"], "ckpt" if r["checkpointing"] else "no-ckpt"]
    if r["method"] == "conv_lora":
        parts.append(r["impl"])
    if r["compile"]:
        parts.append("compile")
    return " ".join(parts)


def table(results: list[dict], peak_tflops: float | None) -> str:
    head = ["model", "method", "img", "batch", "configuration", "step ms (median; rounds min-max)", "images/s",
            "peak GB",
            "x plain"]
    if peak_tflops:
        head.append("MFU %")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        key = (r["model"], r["method"], r["img_size"], r["batch_size"])
        plain = next((p for p in results if (p["model"], p["method"], p["img_size"], p["batch_size"]) == key
                      and is_plain(p) and "error" not in p), None)
        cells = [r["model"], r["method"], str(r["img_size"]), str(r["batch_size"]),
                 describe(r) + (" (plain)" if is_plain(r) else "")]
        if "error" in r:
            cells += [r["error"], "", "", ""] + ([""] if peak_tflops else [])
        else:
            ratio = f"{r['images_per_s'] / plain['images_per_s']:.2f}" if plain else "n/a"
            step = f"{1000 * r['step_s']:.1f}"
            if len(r.get("round_step_s", [])) > 1:  # the spread over rounds
                step += f" ({1000 * min(r['round_step_s']):.0f}-{1000 * max(r['round_step_s']):.0f})"
            cells += [step, f"{r['images_per_s']:.2f}", f"{r['peak_gb']:.2f}", ratio]
            if peak_tflops:
                cells.append(f"{100 * r['encoder_fwd_flops'] * r['images_per_s'] / (peak_tflops * 1e12):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_table(results: list[dict]) -> str:
    """One row per model: step time, memory and encoder GMACs, each as a ratio against the first model."""
    first = next((r for r in results if "error" not in r), None)
    head = ["model", "method", "img", "batch", "configuration", "step ms (median)", "peak GB", "encoder GMACs",
            f"step time x {first['model'] if first else '?'}", "peak memory x", "encoder GMACs x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"], r["method"], str(r["img_size"]), str(r["batch_size"]), describe(r)]
        if "error" in r or first is None:
            cells += [r.get("error", "?")] + [""] * 5
        else:
            cells += [f"{1000 * r['step_s']:.0f}", f"{r['peak_gb']:.2f}", f"{r['encoder_gmacs']:.1f}",
                      f"{r['step_s'] / first['step_s']:.2f}", f"{r['peak_gb'] / first['peak_gb']:.2f}",
                      f"{r['encoder_gmacs'] / first['encoder_gmacs']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_worker(spec: dict, env: dict, timeout: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if lines:
        return json.loads(lines[-1][len(MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**spec, "error": f"exit {proc.returncode}: {tail[0][:200]}"}


def combine_rounds(runs: list[dict]) -> dict:
    """One configuration's rounds: the median of the per-round medians, the largest peak memory."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    out = dict(good[0])
    out["round_step_s"] = [r["step_s"] for r in good]
    out["step_s"] = statistics.median(out["round_step_s"])
    out["images_per_s"] = out["batch_size"] / out["step_s"]
    for key in ("peak_gb", "peak_reserved_gb"):
        if key in out:
            out[key] = max(r[key] for r in good)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default=None, help="comma list: tiny, vit_b, vit_l, vit_h, hiera_t, hiera_s, "
                        "hiera_b+, hiera_l "
                        "(default: tiny on CPU, vit_b,vit_l,vit_h on CUDA)")
    parser.add_argument("--methods", default="conv_lora", help="comma list of PEFT methods")
    parser.add_argument("--img-size", type=int, default=None, help="input side (default 1024 on CUDA, 256 on CPU)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--preset", choices=("ladder", "grid", "family"), default="ladder",
                        help="ladder: the plain path then one optimisation at a time; grid: every combination; "
                             "family: one row per model (SAM's vit_* and SAM 2.1's hiera_*), ratios against the first")
    parser.add_argument("--precisions", default="fp32,bf16", help="grid: comma list of fp32, bf16, fp16")
    parser.add_argument("--checkpointing", default="off,on", help="grid: comma list of off, on")
    parser.add_argument("--attention", default="eager,sdpa", help="grid: comma list of eager, sdpa")
    parser.add_argument("--impl", default="reference,grouped", help="grid: Conv-LoRA implementations")
    parser.add_argument("--compile", default="off", help="grid: comma list of off, on")
    parser.add_argument("--with-compile", action="store_true", help="ladder: add a torch.compile row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole grid this many times, interleaved; report the median of the rounds")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (e.g. 989 for H100 SXM bf16 dense)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args.worker)
        return

    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.models = args.models or ("vit_b,vit_l,vit_h" if cuda else "tiny")
    args.img_size = args.img_size or (1024 if cuda else 256)
    specs = grid(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"{len(specs)} configurations x {args.rounds} round(s), each run in its own process "
          f"({args.warmup} warm-up + {args.steps} timed steps)", flush=True)
    runs: list[list[dict]] = [[] for _ in specs]
    for round_no in range(1, args.rounds + 1):  # rounds interleave the configurations: load changes hit all
        for i, spec in enumerate(specs):
            t0 = time.perf_counter()
            result = run_worker(spec, env, args.timeout)
            runs[i].append(result)
            status = result.get("error") or f"{1000 * result['step_s']:.1f} ms/step, {result['peak_gb']:.2f} GB"
            print(f"[round {round_no}, {i + 1}/{len(specs)}] {spec['model']} {spec['method']} {describe(spec)}: "
                  f"{status} ({time.perf_counter() - t0:.0f}s)", flush=True)
    results = [combine_rounds(r) for r in runs]
    first = next((r for r in results if "error" not in r), {})
    device = first.get("gpu") or f"CPU, {first.get('cpu_threads', '?')} threads"
    print(f"\ndevice: {device}; torch {first.get('torch', '?')}; median of {args.steps} steps after "
          f"{args.warmup} warm-up" + (f", median over {args.rounds} interleaved rounds" if args.rounds > 1 else "")
          + f"; peak GB = {'max allocated' if cuda else 'peak RSS above the import baseline'}")
    print(family_table(results) if args.preset == "family" else table(results, args.peak_tflops))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
