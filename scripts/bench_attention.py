#!/usr/bin/env python
"""Time SAM's encoder attention alone: segment_anything's eager ``Attention`` against samft's SDPA path.

For each model size, one windowed block (14 x 14 windows, as SAM pads the token grid) and one global
block at ``--img-size``, forward + backward (gradients for the input and a LoRA on ``qkv``, as in
training), median of ``--steps`` after warm-up; peak memory on CUDA; the largest output difference
between the two paths. ``--backend`` forces one fused kernel (to check that it accepts the
relative-position mask and its gradient).

    python scripts/bench_attention.py --models vit_b,vit_l,vit_h --img-size 1024 --precision bf16

``--bra`` compares BiFormer's Bi-Level Routing Attention (``model.attention=bra``) with eager and sdpa on
one ViT-B global block (see :func:`bra_main`):

    OMP_NUM_THREADS=1 python scripts/bench_attention.py --bra --sizes 1024,1280,1536,2048 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything.modeling.image_encoder import Attention  # noqa: E402

from samft.model.attention import convert_attention  # noqa: E402
from samft.peft.lora import LoRALinear  # noqa: E402

SIZES = {"vit_b": (768, 12), "vit_l": (1024, 16), "vit_h": (1280, 16), "tiny": (64, 2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench(attn, x, steps, warmup, device, dtype):
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = None
    for i in range(warmup + steps):
        xi = x.detach().requires_grad_(True)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = attn(xi)
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 1024**3 if cuda else float("nan")
    return statistics.median(times), peak, out.detach().float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma list: vit_b, vit_l, vit_h, tiny")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--precision", default=None, choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "efficient", "flash", "cudnn", "math"))
    p.add_argument("--bra", action="store_true", help="BRA vs eager vs sdpa on one ViT-B global block (bench_bra)")
    p.add_argument("--sizes", default="1024,1280,1536,2048", help="--bra: image sizes (px)")
    p.add_argument("--rounds", type=int, default=3, help="--bra: interleaved rounds (median over rounds)")
    p.add_argument("--topk", type=int, default=16, help="--bra: key regions per query region")
    p.add_argument("--region-tokens", type=int, default=8, help="--bra: region side in tokens (S = grid / this)")
    p.add_argument("--limit-gb", type=float, default=12.0, help="--bra: address-space limit of each child (GB)")
    p.add_argument("--threads", type=int, default=1, help="--bra: torch threads in each child")
    p.add_argument("--json", default=None, help="--bra: also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return bra_child(args)
    if args.bra:
        return bra_main(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    models = (args.models or ("vit_b,vit_l,vit_h" if cuda else "vit_b")).split(",")
    img = args.img_size or (1024 if cuda else 512)
    dtype = DTYPES[args.precision or ("bf16" if cuda else "fp32")]
    ctx = None
    if args.backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.backend]
    grid = img // 16
    padded = math.ceil(grid / 14) * 14
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'CPU'}; {dtype}; img {img} (tokens {grid}x{grid}); "
          f"batch {args.batch_size}; forward+backward, median of {args.steps}; backend {args.backend}")
    print("| model | block | tokens x windows | eager ms | sdpa ms | speed-up | eager peak GB | sdpa peak GB | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models:
        dim, heads = SIZES[name]
        for kind, size, windows in (("windowed", 14, args.batch_size * (padded // 14) ** 2),
                                    ("global", grid, args.batch_size)):
            torch.manual_seed(0)
            eager = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(size, size))
            eager.requires_grad_(False)
            eager.qkv = LoRALinear(eager.qkv, rank=4, alpha=8.0)
            eager = eager.to(device)
            fast = convert_attention(copy.deepcopy(eager), "sdpa")
            x = torch.randn(windows, size, size, dim, device=device)
            t_e, m_e, out_e = bench(eager, x, args.steps, args.warmup, device, dtype)
            if ctx is not None:
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel([ctx]):
                    t_f, m_f, out_f = bench(fast, x, args.steps, args.warmup, device, dtype)
            else:
                t_f, m_f, out_f = bench(fast, x, args.steps, args.warmup, device, dtype)
            diff = (out_f - out_e).abs().max().item()
            print(f"| {name} | {kind} | {size * size} x {windows} | {1000 * t_e:.2f} | {1000 * t_f:.2f} | "
                  f"{t_e / t_f:.2f} | {m_e:.3f} | {m_f:.3f} | {diff:.2e} |", flush=True)


# ------------------------------------------------------------------------------------------------ BRA

BRA_IMPLS = ("eager", "sdpa", "bra")


def bra_block(impl: str, grid: int, regions: int, topk: int, device: str = "cpu"):
    """One ViT-B global block's attention at a grid x grid token map with a LoRA (r=4) on qkv."""
    from samft.config import BRAConfig

    dim, heads = SIZES["vit_b"]
    with torch.device(device):
        attn = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(64, 64))  # SAM's tables, interpolated
        attn.requires_grad_(False)
        attn.qkv = LoRALinear(attn.qkv, rank=4, alpha=8.0)
        if impl == "eager":
            return attn
        return convert_attention(attn, impl, BRAConfig(regions=regions, topk=topk, lepe_kernel=5))


def bra_macs(impl: str, grid: int, regions: int, topk: int) -> float:
    """Forward GMACs of the block's attention (qkv, proj, attention, rel-pos, routing, LEPE): samft.prune.encoder_flops."""
    from samft.prune.encoder_flops import bra_attention_flops

    dim = SIZES["vit_b"][0]
    tokens = grid * grid
    flops = 2 * tokens * 4 * dim * dim  # qkv + proj
    if impl == "bra":
        flops += sum(bra_attention_flops(bra_block("bra", grid, regions, topk, "meta"), grid, grid, dim, 1).values())
    else:
        flops += 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * 2 * grid
    return flops / 2e9


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 1024**2


def bra_child(args) -> None:
    """One configuration in a fresh process under RLIMIT_AS: prints one JSON line."""
    import json
    import resource

    impl, img = args.child.split(":")
    grid = int(img) // 16
    regions = grid // args.region_tokens
    topk = min(args.topk, regions * regions)
    limit = int(args.limit_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = bra_block(impl, grid, regions, topk)
    x = torch.randn(1, grid, grid, SIZES["vit_b"][0])
    base = _rss_gb()
    result = {"impl": impl, "img": int(img), "grid": grid, "regions": regions, "topk": topk}
    try:
        wall, cpu = [], []
        for i in range(args.warmup + args.steps):
            xi = x.detach().requires_grad_(True)
            t0, c0 = time.perf_counter(), time.process_time()
            attn(xi).square().mean().backward()
            if i >= args.warmup:
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        result.update(ms=1000 * statistics.median(wall), cpu_ms=1000 * statistics.median(cpu), peak_gb=peak - base)
    except (RuntimeError, MemoryError) as e:  # the allocation beyond RLIMIT_AS
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        result.update(error=f"out of memory under RLIMIT_AS {args.limit_gb:g} GB ({type(e).__name__})")
    print(json.dumps(result), flush=True)


def _run_child(args, impl: str, img: int) -> dict:
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--child", f"{impl}:{img}", "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--topk", str(args.topk), "--region-tokens", str(args.region_tokens),
           "--limit-gb", str(args.limit_gb), "--threads", str(args.threads)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or [""])[-1][:120]
        if proc.returncode < 0 or "memory" in last.lower() or "alloc" in last.lower():
            return {"impl": impl, "img": img, "error": f"out of memory under RLIMIT_AS {args.limit_gb:g} GB ({last})"}
        raise SystemExit(f"{impl} at {img}px failed (exit {proc.returncode}): {last}")
    return json.loads(lines[-1])


def bra_main(args) -> None:
    """BRA against eager and sdpa: one ViT-B global block (12 heads, 768 channels, SAM's rel-pos tables),
    a LoRA (r=4) on qkv, forward + backward (input and LoRA/LEPE gradients), batch 1, fp32, CPU.

    Every (size, implementation) runs in a fresh child process under ``RLIMIT_AS`` (``--limit-gb``): the
    step time is the median of ``--steps`` after ``--warmup``, as the process's CPU time
    (``time.process_time``, one thread: robust to other jobs on a shared machine, which stretch the wall
    time; the wall time is reported too) and the ratios are of CPU times; peak memory is the child's peak RSS
    (``getrusage(RUSAGE_SELF).ru_maxrss``) above its RSS once the block and the input exist (so it is
    the activations, gradients and workspace of the training step; the weights are in the baseline). A
    child that fails to allocate under the limit is reported as out of memory (and not tried again in
    later rounds). The grid of configurations runs ``--rounds`` times interleaved; the table shows the
    median over rounds and the ratios of those medians. MACs: forward, from samft.prune.encoder_flops.
    """
    import json

    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for img in sizes:
            for impl in BRA_IMPLS:
                done = runs.setdefault((impl, img), [])
                if any("error" in d for d in done):
                    continue
                result = _run_child(args, impl, img)
                done.append(result)
                shown = (f"{result['cpu_ms']:.0f} CPU ms ({result['ms']:.0f} wall), {result['peak_gb']:.2f} GB"
                         if "ms" in result else result["error"])
                print(f"# round {r + 1}: {impl} {img}px: {shown}", flush=True)
    table = []
    for img in sizes:
        grid = img // 16
        regions = grid // args.region_tokens
        topk = min(args.topk, regions * regions)
        row = {"img": img, "tokens": grid * grid, "regions": regions, "topk": topk,
               "keys_per_query": topk * args.region_tokens ** 2}
        for impl in BRA_IMPLS:
            done = runs[(impl, img)]
            ok = [d for d in done if "ms" in d]
            row[impl] = {"gmacs": round(bra_macs(impl, grid, regions, topk), 2), "rounds": len(ok)}
            if ok and len(ok) == len(done):
                row[impl].update(ms=statistics.median(d["cpu_ms"] for d in ok),
                                 ms_min=min(d["cpu_ms"] for d in ok), ms_max=max(d["cpu_ms"] for d in ok),
                                 wall_ms=statistics.median(d["ms"] for d in ok),
                                 peak_gb=statistics.median(d["peak_gb"] for d in ok))
            else:
                row[impl]["error"] = next(d["error"] for d in done if "error" in d)
        table.append(row)
    print_bra_table(table, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": table}, indent=2))


def print_bra_table(table: list[dict], args) -> None:
    print(f"CPU time per step, {args.threads} thread(s), fp32, batch 1, forward+backward, median of {args.steps} "
          f"steps after {args.warmup} warm-up, median of {args.rounds} interleaved rounds; "
          f"RLIMIT_AS {args.limit_gb:g} GB")
    print("| px | tokens | S | keys/query (bra) | impl | fwd GMACs | CPU ms (rounds min-max) | wall ms | peak GB | "
          "x eager | x sdpa | mem / eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        for impl in BRA_IMPLS:
            d = row[impl]
            if "ms" not in d:
                print(f"| {row['img']} | {row['tokens']} | {row['regions']} | {row['keys_per_query']} | {impl} | "
                      f"{d['gmacs']} | {d['error']} | | | | | |")
                continue
            e, s = row["eager"], row["sdpa"]
            speed_e = f"{e['ms'] / d['ms']:.2f}" if "ms" in e else "-"
            speed_s = f"{s['ms'] / d['ms']:.2f}" if "ms" in s else "-"
            mem = f"{d['peak_gb'] / e['peak_gb']:.2f}" if "ms" in e else "-"
            print(f"| {row['img']} | {row['tokens']} | {row['regions']} | {row['keys_per_query']} | {impl} | "
                  f"{d['gmacs']} | {d['ms']:.0f} ({d['ms_min']:.0f}-{d['ms_max']:.0f}) | {d['wall_ms']:.0f} | "
                  f"{d['peak_gb']:.2f} | "
                  f"{speed_e} | {speed_s} | {mem} |")


if __name__ == "__main__":
    main()
