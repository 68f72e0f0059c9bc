#!/usr/bin/env python
"""onnxruntime against PyTorch, per PEFT method, on the same inputs in one run (medians).

    python scripts/bench_onnx.py [--sizes tiny,demo] [--batch 4] [--repeats 15] [--threads 1] [--methods a,b]

For every registered PEFT method and every size (``tiny``: the tests' model, 64 px, width 32; ``demo``:
configs/demo.yaml's model, 192 px, width 64, Conv-LoRA rank 3 with 8 experts), the model is built on the
CPU with random base weights and perturbed ("trained-looking") adapters, then:

- torch: the run's own model as ``samft predict`` runs it (unmerged adapters, eval mode, ``no_grad``), the
  graph's function (``OnnxGraph``: image -> logits at the input size);
- onnxruntime: that model exported as ``samft export --onnx`` exports it (mergeable methods folded into
  the encoder, export-friendly paths, opset 17, a dynamic batch), CPU provider, the same thread count.

Both take the same random batch; each is warmed up, then timed ``--repeats`` times, interleaved; the
median of each and the ratio onnxruntime / torch are printed (< 1: onnxruntime is faster). The outputs are
checked equal (max |diff| printed). Conv-LoRA is also exported the way earlier versions did (every expert
on every sample, ``mixture_dense``): the row ``conv_lora (every expert)``, the baseline of its dispatch.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"type": "tiny", "img_size": 64,
        "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1],
                 "out_chans": 32, "decoder_depth": 2, "decoder_mlp_dim": 64, "decoder_heads": 2}}


def model_section(size: str) -> dict:
    if size == "tiny":
        return dict(TINY)
    if size == "demo":
        import yaml

        return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]
    raise SystemExit(f"--sizes: {size!r} is not tiny or demo")


def build(method: str, size: str):
    import torch

    from samft.config import config_from_dict
    from samft.model import build_model

    peft = {"method": method}
    if size == "demo" and method == "conv_lora":
        peft["conv_lora"] = {"rank": 3, "alpha": 32, "experts": 8}
    cfg = config_from_dict({"model": model_section(size), "peft": peft})
    model = build_model(cfg).model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return cfg, model.requires_grad_(False)


@contextlib.contextmanager
def every_expert(model):
    """Conv-LoRA exported as before: every expert on every sample (``mixture_dense``)."""
    from samft.peft.conv_lora import ConvLoRALinear

    layers = [m for m in model.modules() if isinstance(m, ConvLoRALinear)]
    for m in layers:
        m.mixture_gathered = m.mixture_dense
    try:
        yield
    finally:
        for m in layers:
            del m.mixture_gathered


def export(model, cfg, x, dense: bool = False) -> bytes:
    import torch

    import samft.peft as peft
    from samft.engine.artifacts.export import merge_encoder
    from samft.engine.artifacts.onnx_export import OnnxGraph, _trace, export_friendly

    model = __import__("copy").deepcopy(model)
    with torch.no_grad():
        if peft.get(cfg.peft.method).mergeable:
            merge_encoder(model, cfg.peft.method)
    graph = OnnxGraph(model).eval()
    with export_friendly(model), torch.no_grad(), (every_expert(model) if dense else contextlib.nullcontext()):
        return _trace(graph, x[:1], 17, True, "logits")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_one(method: str, size: str, batch: int, repeats: int, dense: bool = False) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from samft.engine.artifacts.onnx_export import OnnxGraph

    cfg, model = build(method, size)
    x = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(1))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(export(model, cfg, x, dense), options, providers=["CPUExecutionProvider"])
    graph = OnnxGraph(model).eval()
    feed = {"image": x.numpy()}

    def run_torch():
        with torch.no_grad():
            return graph(x)

    got, want = session.run(None, feed)[0], run_torch().numpy()  # warm-up, and the equality check
    t_torch, t_ort = [], []
    for _ in range(repeats):  # interleaved: a busy neighbour slows both alike
        t_torch += timed(run_torch, 1)
        t_ort += timed(lambda: session.run(None, feed), 1)
    return {"method": method + (" (every expert)" if dense else ""), "size": size,
            "torch": statistics.median(t_torch), "ort": statistics.median(t_ort),
            "diff": float(np.abs(got - want).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,demo")
    parser.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1: steady "
                        "medians on a shared machine; 0: torch's default)")
    args = parser.parse_args()
    import torch

    import samft.peft as peft

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    methods = [m for m in args.methods.split(",") if m] or list(peft.all_methods())
    print(f"batch {args.batch}, {torch.get_num_threads()} thread(s), median of {args.repeats}; ratio = onnxruntime "
          f"/ torch (< 1: onnxruntime faster)")
    print(f"{'size':6} {'method':28} {'torch ms':>9} {'ort ms':>9} {'ratio':>6} {'max|diff|':>10}")
    for size in args.sizes.split(","):
        for method in methods:
            for dense in ([False, True] if method == "conv_lora" else [False]):
                r = bench_one(method, size, args.batch, args.repeats, dense)
                print(f"{r['size']:6} {r['method']:28} {1000 * r['torch']:9.1f} {1000 * r['ort']:9.1f} "
                      f"{r['ort'] / r['torch']:6.2f} {r['diff']:10.2e}", flush=True)


if __name__ == "__main__":
    main()
