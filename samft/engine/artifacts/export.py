"""Exporting a run's model: merged into a plain SAM checkpoint where the PEFT method allows it.

``export_run(run, out)`` loads the run's best adapter onto its base and then:

- **mergeable methods** (``lora``, ``ssf``, ``bitfit``, ``full``, ``decoder_only``): folds the adapters
  into the encoder weights and writes
  - ``OUT`` — a plain SAM state dict with exactly SAM's keys and shapes, which ``segment_anything``
    loads strictly (``sam_model_registry[type](checkpoint=OUT)``; for ``tiny`` the classes of
    ``samft.model.sam.build_tiny``). The trained decoder pieces are written into SAM's mask decoder
    where SAM has them (two-way transformer, IoU token, output upscaling, mask token 0 and
    hypernetwork 0); SAM's IoU head and its other mask tokens stay as in the base. The position
    embedding is SAM's native one (``img_size / 16`` per side for ``tiny``, 64 for the official sizes):
    the base's own when training left it untouched, else (``full`` at another input size) the trained
    one resized to it, which plain SAM then sees approximately; the head file keeps the exact one.
  - ``OUT.head.safetensors`` (``OUT`` without its suffix + ``.head.safetensors``) — samft's
    ``SemanticMaskDecoder`` (all ``decoder.*`` tensors, the class head included), the exact position
    embedding the run used at its ``img_size``, and metadata (SAM type, image size, queries, classes,
    PEFT method, base sha256, the run's config). SAM's own prompt-driven decoder path attends over
    different tokens, so the semantic output needs this head: :func:`load_exported` rebuilds it.
  A SAM 2.1 run (``model.family: sam2``) writes SAM 2.1's official layout instead (``{"model": SAM2Base
  state dict}``, which ``sam2.build_sam.build_sam2`` loads strictly; video-only parts from the base
  checkpoint or random): see :mod:`samft.engine.artifacts.export_sam2`. Its head holds no position embedding
  (Hiera's is the checkpoint's, interpolated at every forward).
- **other methods** (``conv_lora``, ``adapter``, ``vpt``, ``sam_adapter``), and every method with an
  attention that is not SAM's (``model.attention=bra``): their layers cannot be folded into SAM's
  weights (or SAM's classes cannot run the encoder); ``OUT`` is then the unmerged samft model: a
  ``torch.save`` dict with the run's config and the full state dict (base weights included, so no base
  checkpoint is needed to load it) that :func:`load_exported` rebuilds.
- **quantised runs** (``model.quantize``: nf4, int8): the encoder's quantised linears are de-quantised first, so
  every export holds float32 weights (the de-quantised base, plus the folded adapters when merged) and its stored
  config says ``model.quantize: none``.
- **pruned runs** (``samft prune``, config key ``model.pruned``): SAM's checkpoint format cannot hold a
  pruned encoder, so ``OUT`` is a ``torch.save`` dict (format ``samft-pruned-model-1``) with the run's
  config (``model.pruned`` cleared), the architecture description and the whole state dict, the
  adapters folded in first when the method is mergeable; :func:`load_exported` rebuilds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

import samft.peft as peft

from samft.version import __version__
from samft.config import config_from_dict, dump_yaml, safe_yaml
from samft.engine.artifacts import exports
from samft.engine.artifacts.exports import (HEAD_FORMAT, PRUNED_EXPORT_FORMAT, UNMERGED_FORMAT,  # noqa: F401
                                            head_path)
from samft.engine.artifacts.loading import LoadedRun, load_run
from samft.engine.artifacts.merged_decoder import decoder_into
from samft.engine.artifacts.rundir import ADAPTER_FILE, is_run_file
from samft.errors import CheckpointError, SamftError
from samft.model import SemanticSAM, build_model
from samft.model.attention import attention_function
from samft.model.sam import SAM_NATIVE_SIZE, build_sam, interpolate_pos_embed, sam_size, set_image_size  # noqa: F401
from samft.peft.decoder import merge_decoder
from samft.peft.inject import is_wrapper
from samft.peft.quantize import dequantize_encoder
from samft.slip.text import attach_text_class_head, stored_text_embeddings

POS_EMBED = "image_encoder.pos_embed"


@dataclass(frozen=True)
class ExportArgs:
    """What exporting a run reads of its config and adapter, gathered once where the run is loaded."""

    sam_type: str
    img_size: int
    peft_method: str
    attention: str
    pruned: Optional[str]  # model.pruned: the pruned run's base file
    base_sha256: str
    config_yaml: str  # the run's resolved config, stored in the export
    model_cfg: Any  # the model section (SAM's native-size base is built from it)

    @property
    def mergeable(self) -> bool:
        return peft.get(self.peft_method).mergeable

    @property
    def sam_attention(self) -> bool:
        """Whether the encoder's attention is SAM's function (plain segment_anything can run it)."""
        return attention_function(self.attention) == "dense"

    @classmethod
    def of(cls, run: LoadedRun) -> "ExportArgs":
        cfg = run.cfg
        stored = cfg if not (cfg.model.pruned or cfg.model.quantize != "none") else dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, pruned=None, quantize="none"))  # it carries its own (float) weights
        return cls(cfg.model.type, cfg.model.img_size, cfg.peft.method, cfg.model.attention, cfg.model.pruned,
                   run.meta.get("base_sha256", ""), dump_yaml(stored), cfg.model)


@dataclass
class ExportResult:
    merged: bool
    method: str
    files: list[Path]
    merged_layers: int = 0  # adapter layers folded into the encoder (0 when nothing was wrapped)
    reason: str = ""  # why an export is unmerged, when not the PEFT method (another attention function)
    pruned: bool = False  # a pruned run: one file, architecture + state dict
    video: str = ""  # a merged SAM 2.1 run: where its checkpoint's video-only parts come from

    def message(self) -> str:
        if self.pruned:
            how = f"{self.merged_layers} {self.method} layer(s) merged" if self.merged else \
                f"{self.method} layers kept unmerged (they cannot be folded)"
            return (f"pruned model ({how}): wrote {self.files[0]} (architecture + state dict; load it with "
                    f"samft.engine.artifacts.export.load_exported)")
        if self.merged:
            what = f"merged {self.merged_layers} {self.method} layer(s) into the encoder" if self.merged_layers \
                else f"{self.method}: the encoder is plain SAM, nothing to fold"
            if self.video:
                what = what.replace("plain SAM", "plain SAM 2.1")
                return (f"{what}; wrote {self.files[0]} (a SAM 2.1 checkpoint, key 'model', that sam2's build_sam2 "
                        f"loads strictly; its video-only parts {self.video}) and {self.files[1]} (samft decoder head)")
            return (f"{what}; wrote {self.files[0]} (plain segment_anything checkpoint) and {self.files[1]} "
                    f"(samft decoder head)")
        if self.reason:
            return (f"{self.reason}; wrote the unmerged samft model to {self.files[0]} (load it with "
                    f"samft.engine.artifacts.export.load_exported)")
        return (f"{self.method} cannot be merged: its layers cannot be folded into SAM's weights; wrote the unmerged "
                f"samft model to {self.files[0]} (load it with samft.engine.artifacts.export.load_exported)")


def _native_model_cfg(model_cfg):
    """The model config at SAM's native input size (the size of the checkpoint's pos_embed)."""
    return dataclasses.replace(model_cfg, img_size=sam_size(model_cfg.type).native_size(model_cfg))


def _sam_state(model: SemanticSAM, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full SAM state dict: the base's, with the (merged) encoder and the trained decoder parts."""
    state = {k: v.clone() for k, v in base_state.items()}
    for k, v in model.image_encoder.state_dict().items():
        key = f"image_encoder.{k}"
        if key not in state:
            raise SamftError(f"merged encoder tensor {k} is not part of SAM (a wrapper was left unmerged)")
        if key == POS_EMBED and v.shape != state[key].shape:
            native = state[key]
            if torch.equal(interpolate_pos_embed(native, tuple(v.shape[1:3])), v):
                continue  # untrained: SAM's own native embedding gives the same one at the run's size
            v = interpolate_pos_embed(v, tuple(native.shape[1:3]))  # trained at another size (full fine-tuning)
        if v.shape != state[key].shape:
            raise SamftError(f"merged encoder tensor {k} has shape {tuple(v.shape)}, SAM has {tuple(state[key].shape)}")
        state[key] = v.detach().clone()
    for k, v in model.prompt_encoder.state_dict().items():
        state[f"prompt_encoder.{k}"] = v.detach().clone()
    decoder_into(state, model.decoder.state_dict(), "mask_decoder.")
    return state


def merge_encoder(model: SemanticSAM, method: str) -> int:
    """Fold a mergeable method's adapter layers into the encoder's weights in place; returns how many.
    Raises when a layer is left (the encoder must then be plain SAM)."""
    folded = peft.get(method).merge(model.image_encoder)
    left = [n for n, m in model.image_encoder.named_modules() if is_wrapper(m)]
    if left:
        raise SamftError(f"PEFT method {method}: merging left adapter layers {left[:3]}")
    return folded


def check_export_name(out: Path, option: str, suffixes: tuple[str, ...], what: str) -> None:
    """An export's name says what it holds: ``--merged model.png`` would leave a checkpoint that the next tool
    takes for an image (and a folder of images would take it in)."""
    if out.suffix.lower() not in suffixes:
        raise SamftError(f"{out}: {option} writes {what}; give a name ending in {' or '.join(suffixes)}, e.g. "
                         f"model{suffixes[0]}")


def check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse to write ``out`` (and its head file) onto a folder, a run's own files (even with
    ``overwrite``) or an existing file (unless ``overwrite``), or under a name that is not a checkpoint's."""
    if out.is_dir():
        raise SamftError(f"{out}: is a folder; --merged needs a file name such as model.pth")
    for target in (out, head_path(out)):
        if is_run_file(target):
            raise SamftError(f"{target}: is a run's own file; samft export never writes over it (choose another "
                             f"name, e.g. model.pth)")
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise SamftError(f"{target}: already exists; pass --overwrite to replace it, or choose another name")
    check_export_name(out, "--merged", (".pth", ".pt"), "a PyTorch checkpoint")


def _write(path: Path, write) -> None:
    try:
        write()
    except OSError as e:
        raise SamftError(f"{path}: cannot write the export ({e.strerror or e})") from None


def export_run(run_dir: str | Path, out: str | Path, adapter: str = ADAPTER_FILE,
               overwrite: bool = False) -> ExportResult:
    """Export ``run_dir``'s model to ``out`` (see the module docstring). Runs on the CPU. An existing
    ``out`` is replaced only when ``overwrite``; a run's own files never."""
    out = Path(out)
    check_export_target(out, overwrite)
    run = load_run(run_dir, torch.device("cpu"), adapter)
    args, model = ExportArgs.of(run), run.model.eval()
    dequantize_encoder(model.image_encoder)  # model.quantize: every export holds the de-quantised float weights
    if args.pruned:
        return _export_pruned(args, model, out)
    if not args.mergeable or not args.sam_attention:
        return _export_unmerged(args, model, out)
    return _export_merged(args, model, out)


def _state_dict(model: SemanticSAM) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _export_unmerged(args: ExportArgs, model: SemanticSAM, out: Path, reason: str = "") -> ExportResult:
    record = {"samft_version": __version__, "peft_method": args.peft_method, "sam_type": args.sam_type,
              "base_sha256": args.base_sha256, "config_yaml": args.config_yaml, "state_dict": _state_dict(model)}
    _write(out, lambda: exports.write_model(out, exports.UNMERGED, record))
    reason = reason or ("" if args.sam_attention else (f"model.attention={args.attention} is not SAM's attention, "
                                                       f"so plain segment_anything cannot run this encoder"))
    return ExportResult(False, args.peft_method, [out], reason=reason)


def _merged_checkpoint(args: ExportArgs, model: SemanticSAM) -> tuple[dict, str]:
    """The base family's own checkpoint of a model whose adapters are folded: SAM's state dict, or SAM 2.1's
    ``{"model": SAM2Base state dict}``; and, for SAM 2.1, where its video-only parts come from."""
    if args.model_cfg.family == "sam2":
        from samft.engine.artifacts.export_sam2 import sam2_merged_state

        state, video = sam2_merged_state(model, args.model_cfg)
        return {"model": state}, video
    base = build_sam(_native_model_cfg(args.model_cfg))  # the base's full SAM (IoU head, other mask tokens)
    return _sam_state(model, base.state_dict()), ""


def _export_merged(args: ExportArgs, model: SemanticSAM, out: Path) -> ExportResult:
    sam1 = args.model_cfg.family == "sam"
    with torch.no_grad():
        pos_embed = model.image_encoder.pos_embed.detach().clone() if sam1 and model.image_encoder.pos_embed \
            is not None else None  # SAM 2.1's is the checkpoint's (Hiera interpolates it at every forward)
        folded = merge_encoder(model, args.peft_method)
        merge_decoder(model.decoder)  # model.decoder=peft: its LoRA folded into SAM's decoder linears
        state, video = _merged_checkpoint(args, model)
    head = {f"decoder.{k}": v.detach().cpu().contiguous().clone() for k, v in model.decoder.state_dict().items()}
    if pos_embed is not None:
        head[POS_EMBED] = pos_embed.cpu().contiguous()
    meta = {"samft_version": __version__, "family": args.model_cfg.family, "sam_type": args.sam_type,
            "img_size": str(args.img_size), "num_queries": str(model.decoder.num_queries),
            "num_classes": str(model.num_classes), "peft_method": args.peft_method, "base_sha256": args.base_sha256,
            "config_yaml": args.config_yaml}
    _write(out, lambda: exports.write_merged(out, state, head, meta))
    return ExportResult(True, args.peft_method, [out, head_path(out)], folded, video=video)


def _export_pruned(args: ExportArgs, model: SemanticSAM, out: Path) -> ExportResult:
    """A pruned run: adapters folded when mergeable, then architecture + whole state dict in one file."""
    from samft.prune.state import read_pruned

    arch = read_pruned(args.pruned, tensors=False)[0]
    folded = 0
    if args.mergeable:
        with torch.no_grad():
            folded = merge_encoder(model, args.peft_method)
    exports.write_model(out, exports.PRUNED, {
        "samft_version": __version__, "peft_method": args.peft_method, "merged": args.mergeable,
        "sam_type": args.sam_type, "base_sha256": args.base_sha256, "config_yaml": args.config_yaml,
        "architecture": arch, "state_dict": _state_dict(model),
    })
    return ExportResult(args.mergeable, args.peft_method, [out], folded, pruned=True)


def _load_pruned(export: exports.Export, device: torch.device) -> tuple[SemanticSAM, Any]:
    from samft.prune.errors import PruneError
    from samft.prune.rebuild import build_pruned_encoder

    path, data = export.path, export.data
    cfg = _config(data["config_yaml"], str(path))
    built = _structure(cfg, data, path)  # the structure only; every tensor comes from the file
    try:
        build_pruned_encoder(built.model.image_encoder, data["architecture"])
    except (PruneError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its architecture does not fit its config: {e}") from None
    if data.get("merged"):
        peft.get(cfg.peft.method).merge(built.model.image_encoder)
    return _loaded(built.model, data["state_dict"], device, f"{path}: does not fit its architecture"), cfg


def _config(yaml_text: str, source: str):
    try:
        return config_from_dict(safe_yaml(yaml_text) or {})
    except yaml.YAMLError as e:
        raise CheckpointError(f"{source}: the stored config is not valid YAML ({str(e).splitlines()[0]})") from None
    except SamftError as e:
        raise CheckpointError(f"{source}: the stored config is not valid for this samft: {e}") from None


def _structure(cfg, data: dict, path: Path):
    """The model of ``cfg``, structure only (every tensor comes from the file's state dict)."""
    state = data["state_dict"]
    emb = stored_text_embeddings(cfg, state, str(path))
    return build_model(cfg, meta=True, text_emb=None if emb is None else torch.empty_like(emb, device="meta"))


def _load_unmerged(export: exports.Export, device: torch.device) -> tuple[SemanticSAM, Any]:
    path, data = export.path, export.data
    cfg = _config(data["config_yaml"], str(path))
    built = _structure(cfg, data, path)
    return _loaded(built.model, data["state_dict"], device, f"{path}: does not fit the model of its own config",
                   first_line=False), cfg


def _loaded(model: SemanticSAM, state: dict, device: torch.device, fails: str, first_line: bool = True) -> SemanticSAM:
    """``model`` (meta) given ``state`` strictly, frozen, on ``device``, in eval mode; else ``fails: why``."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{fails}: {str(e).splitlines()[0] if first_line else e}") from None
    model.requires_grad_(False)
    return model.to(device).eval()


def _merged_sam(export: exports.Export, cfg) -> Any:
    """SAM of the head's config at its run's input size, the merged checkpoint loaded strictly."""
    sam = build_sam(dataclasses.replace(_native_model_cfg(cfg.model), checkpoint=None), meta=True)
    try:
        sam.load_state_dict(export.data, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{export.path}: not a SAM {cfg.model.type} checkpoint: {e}") from None
    set_image_size(sam, cfg.model.img_size)
    if POS_EMBED in export.head:
        sam.image_encoder.pos_embed = torch.nn.Parameter(export.head[POS_EMBED], requires_grad=False)
    return sam


def _load_merged(export: exports.Export, device: torch.device) -> tuple[SemanticSAM, Any]:
    head, meta, head_file = export.head, export.head_meta, export.head_file
    cfg = _config(meta["config_yaml"], str(head_file))
    queries, classes = int(meta["num_queries"]), int(meta["num_classes"])
    if cfg.model.family == "sam2":
        from samft.engine.artifacts.export_sam2 import merged_sam2_model

        model = merged_sam2_model(export, cfg, queries, classes)
    else:
        model = SemanticSAM(_merged_sam(export, cfg), queries, classes)
    emb = stored_text_embeddings(cfg, head, str(head_file))
    if emb is not None:
        attach_text_class_head(cfg, model.decoder, emb)
    decoder = {k[len("decoder."):]: v for k, v in head.items() if k.startswith("decoder.")}
    try:
        model.decoder.load_state_dict(decoder, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{head_file}: does not fit the decoder: {e}") from None
    model.requires_grad_(False)
    return model.to(device).eval(), cfg


_LOADERS = {exports.UNMERGED: _load_unmerged, exports.PRUNED: _load_pruned, exports.MERGED: _load_merged}


def load_exported(path: str | Path, device: torch.device | str = "cpu",
                  head_file: Optional[str | Path] = None) -> SemanticSAM:
    """The SemanticSAM of an export (frozen, in eval mode): a merged SAM checkpoint + its head, an
    unmerged samft model, or a pruned model."""
    return load_exported_with_config(path, device, head_file)[0]


def load_exported_with_config(path: str | Path, device: torch.device | str = "cpu",
                              head_file: Optional[str | Path] = None) -> tuple[SemanticSAM, Any]:
    """:func:`load_exported` and the config the export was made from (its task, sizes, thresholds)."""
    export = exports.read(path, head_file)  # recognised by its stored kind (earlier versions: its shape)
    return _LOADERS[export.kind](export, torch.device(device))
