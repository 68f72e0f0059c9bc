"""Encoder weight memory with ``model.quantize`` (none, nf4, int8) for SAM vit_b and vit_h.

The encoder's structure is built on the meta device (no weights read); each distinct shape of its blocks' linear
layers is quantised once for real on the CPU by samft's own path (bitsandbytes; random weights: the byte count
does not depend on the values) and its stored tensors counted (packed weight, bias, block scales and tables).
Everything else of the encoder (patch embedding, position embeddings, norms, neck) stays float32.

    python scripts/quant_memory.py            # Markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from samft.config import config_from_dict  # noqa: E402
from samft.model import build_model  # noqa: E402
from samft.peft.quantize import quantized_linear, weight_bytes  # noqa: E402

SIZES = ("vit_b", "vit_h")


def _linears(encoder: nn.Module) -> list[nn.Linear]:
    return [m for n, m in encoder.named_modules() if type(m) is nn.Linear and n.startswith("blocks.")]


def encoder_bytes(size: str) -> dict[str, int]:
    """Bytes of the encoder's weights: its block linears as fp32, nf4 and int8, and the rest (float32)."""
    encoder = build_model(config_from_dict({"model": {"type": size}, "peft": {"method": "decoder_only"}}),
                          meta=True).model.image_encoder
    linears = _linears(encoder)
    linear_params = {id(p) for m in linears for p in m.parameters()}
    rest = sum(p.numel() * 4 for p in encoder.parameters() if id(p) not in linear_params)
    out = {"rest": rest, "fp32": sum((m.weight.numel() + m.out_features) * 4 for m in linears)}
    for kind in ("nf4", "int8"):
        cache: dict[tuple, int] = {}
        total = 0
        for m in linears:
            key = (m.in_features, m.out_features, m.bias is not None)
            if key not in cache:
                plain = nn.Linear(*key[:2], bias=key[2]).requires_grad_(False)
                cache[key] = weight_bytes(quantized_linear(plain, kind))
            total += cache[key]
        out[kind] = total
    out["count"] = len(linears)
    return out


def table() -> str:
    lines = ["| encoder | block linears | fp32 linears | nf4 linears | int8 linears | rest (fp32) | encoder fp32 "
             "| encoder nf4 | encoder int8 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    for size in SIZES:
        b = encoder_bytes(size)
        ratio = {k: b[k] / b["fp32"] for k in ("nf4", "int8")}
        lines.append(f"| {size} | {b['count']} | {mib(b['fp32'])} | {mib(b['nf4'])} ({ratio['nf4']:.3f}x) | "
                     f"{mib(b['int8'])} ({ratio['int8']:.3f}x) | {mib(b['rest'])} | {mib(b['fp32'] + b['rest'])} | "
                     f"{mib(b['nf4'] + b['rest'])} | {mib(b['int8'] + b['rest'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.manual_seed(0)
    print(table(), end="")
