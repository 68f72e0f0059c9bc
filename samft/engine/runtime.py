"""Device and precision selection shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib
import os

import torch

from samft.errors import ConfigError, SamftError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name: str = "auto", option: str = "--device") -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda, cuda:N); errors name ``option``, where the value came from
    (``train.device`` in training, ``--device`` on the command line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {name!r} asked for, but CUDA is not available on this machine")
    return device


def _cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA (fp16 on GPUs without bf16, e.g. V100/T4), fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if _cuda_bf16(device) else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
        raise ConfigError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                          "use fp16 (with a GradScaler) or fp32")
    return precision


OOM_TEXTS = ("can't allocate memory", "out of memory", "DefaultCPUAllocator")  # the allocators' RuntimeErrors


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocator's failure (CUDA or CPU), not a bug."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in OOM_TEXTS)


@contextlib.contextmanager
def memory_advice(what: str, advice: str):
    """Turn running out of memory inside the ``with`` into one line: ``what`` did not fit, ``advice``."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        kind = "GPU" if "CUDA" in str(e) or isinstance(e, torch.OutOfMemoryError) else "CPU"
        raise SamftError(f"out of {kind} memory: {what} did not fit; {advice}") from None


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


# torch.compile backend for train.compile; SAMFT_COMPILE_BACKEND=aot_eager (tracing only, no code
# generation) helps to tell a tracing problem from a code-generation one.
COMPILE_BACKEND = os.environ.get("SAMFT_COMPILE_BACKEND", "inductor")


def check_compile(device: torch.device) -> None:
    """Fail early, with the reason, when ``torch.compile`` cannot compile on ``device``.

    A tiny function is compiled and run with the configured backend, which needs what the real model
    needs (a C++ compiler for inductor on CPU, Triton on CUDA) and takes a few seconds.
    """
    hint = "set train.compile=false to train without it"
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("torch.compile does not support this Python/platform")
        probe = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend=COMPILE_BACKEND, fullgraph=True)
        probe(torch.linspace(0, 1, 8, device=device))  # no random numbers: the RNG streams stay untouched
    except Exception as e:  # noqa: BLE001 - any failure means "unavailable here"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"train.compile: torch.compile (backend {COMPILE_BACKEND}) is unavailable on {device}: "
                          f"{type(e).__name__}: {reason}; {hint}") from None


def compile_blocks(blocks: torch.nn.Module) -> int:
    """Compile each module of ``blocks`` in place (``Module.compile``: names and state-dict keys are kept).

    Shapes are specialised (``dynamic=False``): a block sees a handful of shapes (training batch, the
    last smaller batch, evaluation batches), and with activation checkpointing the recomputation must
    pick the very graph the forward pass used, which automatic dynamic shapes do not guarantee. Methods
    that a sub-module names in ``eager_methods`` (data-dependent shapes, e.g. Conv-LoRA's expert
    dispatch) are excluded from the graphs and run eagerly.
    """
    count = 0
    for block in blocks:
        for module in block.modules():
            for name in getattr(module, "eager_methods", ()):
                setattr(module, name, torch.compiler.disable(getattr(module, name)))
        block.compile(backend=COMPILE_BACKEND, dynamic=False)
        count += 1
    return count
