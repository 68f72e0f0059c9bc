"""Whole-model ONNX export of a run: normalised image -> mask logits / class scores, verified at export.

``export_onnx(run, out)`` loads the run's best adapter on the CPU and writes ONE graph:

- input ``image``: (B, 3, S, S) float32, normalised with SAM's pixel mean/std and zero-padded to S x S
  (see :mod:`samft.deploy_onnx`, the numpy pre- and post-processing);
- output ``logits`` (binary): mask logits (B, 1, S, S) at the input size (sigmoid >= threshold = mask),
  or ``scores`` (multi-class): MaskFormer's per-pixel class scores (B, C, S, S) (argmax = labels).

B is 1, or any batch size with ``dynamic_batch``. Mergeable PEFT methods (LoRA, SSF, BitFit ...) are
folded into the encoder's weights first; the others are exported as they are, layers whose forward
does not trace (Conv-LoRA's data-dependent expert dispatch, SAM-Adapter's FFT) switched to their
export-friendly eval paths (``AdapterLayer.export_friendly``; each tested equal to its normal path).
An encoder attention implementation with ``onnx_exportable = False`` is refused with an error naming
``model.attention``.

The graph is fp32 throughout, LayerNorm included. Keep LayerNorm in fp32 when converting to fp16 (e.g.
for TensorRT): the variance of the ViT's activations overflows fp16 there (efficientvit issue #142).

Verification: onnxruntime (CPU) runs the file on a random image (a batch of 2 with ``dynamic_batch``)
and, when one is given, a real image; the largest absolute difference from the PyTorch model must stay
within ``tolerance`` (default :data:`TOLERANCE`) or :class:`~samft.errors.SamftError` is raised and no
file is left behind.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

import samft.peft as peft

from samft.version import __version__
from samft.constants import PIXEL_MEAN, PIXEL_STD
from samft.config import dump_yaml
from samft.data.classes import ClassSpec
from samft.engine.artifacts import onnx_meta
from samft.engine.artifacts.export import check_export_name, merge_encoder
from samft.engine.artifacts.loading import LoadedRun, load_run
from samft.engine.artifacts.onnx_meta import META_PREFIX  # noqa: F401  (re-exported)
from samft.engine.artifacts.rundir import ADAPTER_FILE, is_run_file
from samft.errors import SamftError
from samft.model import SemanticSAM
from samft.model.attention import EncoderAttention
from samft.model.semantic import semantic_probs, upsample_logits
from samft.peft.inject import AdapterLayer
from samft.peft.quantize import dequantize_encoder

TOLERANCE = 1e-3  # largest |onnxruntime - PyTorch| allowed on the output (logits or class scores), fp32
DEFAULT_OPSET = 17  # LayerNormalization is a single op from opset 17
MIN_OPSET, MAX_OPSET = 14, 20  # scaled_dot_product_attention needs 14; the TorchScript exporter stops at 20


@dataclass(frozen=True)
class OnnxArgs:
    """What the ONNX export reads of a run's config, gathered once where the run is loaded."""

    img_size: int
    peft_method: str
    attention: str
    sam_type: str
    threshold: float
    classes: list[str]  # class names of a multi-class run, [] for a binary one
    config_yaml: str  # the run's resolved config (test sets, input geometry ... for samft eval/predict --run)

    @property
    def mergeable(self) -> bool:
        return peft.get(self.peft_method).mergeable

    @classmethod
    def of(cls, run: LoadedRun) -> "OnnxArgs":
        cfg = run.cfg
        spec = ClassSpec.of(cfg.data)
        return cls(cfg.model.img_size, cfg.peft.method, cfg.model.attention, cfg.model.type, cfg.eval.threshold,
                   list(spec.names) if spec else [], dump_yaml(cfg))

    def metadata(self, output: str, opset: int) -> dict[str, object]:
        """The graph's ``samft.*`` metadata (read back by :mod:`samft.deploy_onnx`)."""
        return {"version": __version__, "img_size": str(self.img_size),
                "task": "multiclass" if self.classes else "binary", "output": output,
                "threshold": str(self.threshold), "classes": self.classes, "peft_method": self.peft_method,
                "attention": self.attention, "sam_type": self.sam_type, "pixel_mean": list(PIXEL_MEAN),
                "pixel_std": list(PIXEL_STD), "opset": str(opset), "config_yaml": self.config_yaml}


class OnnxGraph(nn.Module):
    """What is exported: (B, 3, S, S) -> logits (B, 1, S, S) (binary) or class scores (B, C, S, S)."""

    def __init__(self, model: SemanticSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        logits = upsample_logits(out.masks, tuple(images.shape[-2:]))
        if out.class_logits is None:
            return logits
        return semantic_probs(out.class_logits, logits)


@dataclass
class OnnxResult:
    path: Path
    method: str
    merged_layers: int
    bytes: int
    checks: dict[str, float] = field(default_factory=dict)  # input -> max |onnxruntime - PyTorch|
    tolerance: float = TOLERANCE

    def message(self) -> str:
        what = f"{self.method} merged ({self.merged_layers} layer(s))" if self.merged_layers else self.method
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.checks.items())
        return (f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, {what}); onnxruntime vs PyTorch max |diff|: "
                f"{diffs} (tolerance {self.tolerance:g})")


def require_onnx() -> None:
    """Raise a SamftError naming the extra when onnx or onnxruntime is missing."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise SamftError(f"ONNX export needs the {name} package: pip install 'samft[onnx]'") from None


def check_exportable(model: SemanticSAM, attention: str) -> None:
    """Refuse an encoder whose attention implementation declares it cannot be exported."""
    bad = sorted({type(m).kind or type(m).__name__ for m in model.image_encoder.modules()
                  if isinstance(m, EncoderAttention) and not type(m).onnx_exportable})
    if bad:
        raise SamftError(f"model.attention: {', '.join(repr(b) for b in bad)} cannot be exported to ONNX (its "
                         f"forward does not trace to a static graph); this run uses model.attention={attention!r}: "
                         f"export a model trained with an exportable one (sdpa, eager)")


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[None]:
    """Switch every adapter layer to its traceable eval path for the duration (see AdapterLayer)."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    for m in layers:
        m.export_friendly = True
    try:
        yield
    finally:
        for m in layers:
            m.export_friendly = False


def _trace(graph: OnnxGraph, example: torch.Tensor, opset: int, dynamic_batch: bool, output: str) -> bytes:
    """The ONNX bytes of ``graph`` traced on ``example`` (the TorchScript exporter: one static graph)."""
    buf = io.BytesIO()
    axes = {"image": {0: "batch"}, output: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # SAM's window padding and scale are Python numbers of the (fixed) input size; the batch axis is
        # checked by the verification below, at another batch size when it is dynamic
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=[output], dynamic_axes=axes, do_constant_folding=True)
    return buf.getvalue()


def _ort_outputs(data: bytes, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return {name: session.run(None, {"image": x.numpy()})[0] for name, x in inputs.items()}


def _real_input(image: Optional[Path], img_size: int) -> Optional[torch.Tensor]:
    if image is None:
        return None
    from samft.data.io import read_image
    from samft.data.transforms import SamTransform

    return SamTransform(img_size)(read_image(image))["image"][None]


def _check_target(out: Path, overwrite: bool, opset: int) -> None:
    if out.is_dir():
        raise SamftError(f"{out}: is a folder; --onnx needs a file name such as model.onnx")
    if is_run_file(out):
        raise SamftError(f"{out}: is a run's own file; samft export never writes over it (choose another name, "
                         f"e.g. model.onnx)")
    check_export_name(out, "--onnx", (".onnx",), "an ONNX graph")
    if out.exists() and not overwrite:
        raise SamftError(f"{out}: already exists; pass --overwrite to replace it")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SamftError(f"--opset {opset}: expected {MIN_OPSET} to {MAX_OPSET}")


def _inputs(size: int, dynamic_batch: bool, image: Optional[str | Path]) -> dict[str, torch.Tensor]:
    """The verification inputs: a random image (a batch of 2 with ``dynamic_batch``) and the real one."""
    inputs = {"random image": torch.randn(2 if dynamic_batch else 1, 3, size, size,
                                          generator=torch.Generator().manual_seed(0))}
    real = _real_input(Path(image) if image is not None else None, size)
    if real is None:
        warnings.warn("ONNX export verified on a random image only: pass --image PATH to also check a real one")
    else:
        inputs[f"real image {Path(image).name}"] = real
    return inputs


def _traced(graph: OnnxGraph, args: OnnxArgs, example: torch.Tensor, opset: int, dynamic_batch: bool,
            output: str) -> bytes:
    try:
        with export_friendly(graph.model), torch.no_grad():
            return _trace(graph, example, opset, dynamic_batch, output)
    except Exception as e:  # noqa: BLE001 - any exporter failure: name what was being exported
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SamftError(f"ONNX export of PEFT method {args.peft_method} with model.attention={args.attention} "
                         f"failed: {type(e).__name__}: {first}") from None


def _verify(out: Path, got: dict[str, np.ndarray], want: dict[str, np.ndarray], tolerance: float) -> dict[str, float]:
    """max |onnxruntime - PyTorch| per input; a SamftError (nothing written) beyond ``tolerance``."""
    checks = {}
    for name in want:
        if got[name].shape != want[name].shape:
            raise SamftError(f"{out}: onnxruntime gave shape {got[name].shape} on the {name}, PyTorch "
                             f"{want[name].shape}: not written")
        checks[name] = float(np.abs(got[name] - want[name]).max())
        if not checks[name] <= tolerance:  # NaN fails too
            raise SamftError(f"{out}: onnxruntime differs from PyTorch by {checks[name]:.3g} on the {name} "
                             f"(tolerance {tolerance:g}): not written")
    return checks


def export_onnx(run_dir: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                image: Optional[str | Path] = None, tolerance: float = TOLERANCE, overwrite: bool = False,
                adapter: str = ADAPTER_FILE) -> OnnxResult:
    """Export ``run_dir``'s model to the ONNX file ``out`` and verify it (see the module docstring).

    ``image``: a real image to verify on besides the random one (None: the random one only, with a
    warning). Runs on the CPU.
    """
    out = Path(out)
    _check_target(out, overwrite, opset)
    run = load_run(run_dir, torch.device("cpu"), adapter)
    args, model = OnnxArgs.of(run), run.model.eval()
    check_exportable(model, args.attention)
    require_onnx()
    graph = OnnxGraph(model).eval()
    inputs = _inputs(args.img_size, dynamic_batch, image)
    with torch.no_grad():
        want = {name: graph(x).numpy() for name, x in inputs.items()}  # the run's own (unmerged) model
        dequantize_encoder(model.image_encoder)  # model.quantize: the graph holds the de-quantised float weights
        merged = merge_encoder(model, args.peft_method) if args.mergeable else 0
    output = "scores" if model.num_classes > 1 else "logits"
    data = _traced(graph, args, inputs["random image"][:1], opset, dynamic_batch, output)
    data = onnx_meta.with_metadata(data, args.metadata(output, opset))
    checks = _verify(out, _ort_outputs(data, inputs), want, tolerance)
    onnx_meta.write_bytes(out, data)
    return OnnxResult(out, args.peft_method, merged, len(data), checks, tolerance)
