"""Typed configuration: a tree of dataclasses, strict YAML loading and ``key=value`` overrides.

Every field has a default and one line of help (``samft.config.field.opt``). Loading rejects unknown keys and
suggests the nearest valid name; values are coerced to the field's type, and a value that cannot be
coerced is an error naming the dotted key, the value and the expected type.

The ``peft`` section is built from the PEFT registry: ``peft.method`` picks a method and each method
has its own sub-section (``peft.conv_lora.rank``, ``peft.lora.alpha`` ...), defined in that method's
module. Only the active method's section is written to a run's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from samft.errors import ConfigError
from samft.config.field import opt, section
from samft.config.metric_names import METRIC_CHOICES, canonical, task_metric_names
from samft.config.protocol import PROTOCOLS, apply_protocol

def _model_types() -> tuple[str, ...]:
    from samft.model.sam import sam_sizes  # the size registry, looked up at validation time

    return tuple(sam_sizes())


def _attention_names() -> tuple[str, ...]:
    from samft.model.attention import attention_names  # the registry, looked up at validation time

    return attention_names()


@dataclass
class TinyConfig:
    """Sizes of the small SAM built from the real classes for CPU tests and the demo."""

    embed_dim: int = opt(64, "encoder width (ViT embedding dimension)", minimum=8)
    depth: int = opt(2, "number of encoder blocks", minimum=1)
    num_heads: int = opt(2, "encoder attention heads (must divide embed_dim)", minimum=1)
    window_size: int = opt(4, "window size of the windowed encoder blocks", minimum=1)
    global_attn_indexes: list[int] = opt([1], "encoder blocks that use global attention")
    out_chans: int = opt(64, "encoder output = prompt encoder = mask decoder width (divisible by 8)", minimum=8)
    decoder_depth: int = opt(2, "two-way transformer depth in the mask decoder", minimum=1)
    decoder_mlp_dim: int = opt(256, "two-way transformer MLP width", minimum=1)
    decoder_heads: int = opt(4, "two-way transformer heads ((out_chans / 2) must be divisible by it)", minimum=1)

    def check(self, prefix: str) -> None:
        """The rules that tie the sizes together (the real classes would fail obscurely otherwise)."""
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{prefix}.num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.out_chans % 8:
            raise ConfigError(f"{prefix}.out_chans: {self.out_chans} is not divisible by 8")
        if (self.out_chans // 2) % self.decoder_heads:
            raise ConfigError(f"{prefix}.decoder_heads: {self.decoder_heads} does not divide out_chans/2 = "
                              f"{self.out_chans // 2}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"{prefix}.global_attn_indexes: {bad} outside 0..{self.depth - 1}")


# SLIP's zero-shot ImageNet prompt ensemble (its templates.json, "imagenet"), averaged per class name.
SLIP_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


@dataclass
class TextConfig:
    """Class-name embeddings for the text class head and the region-text loss (SLIP's language branch)."""

    embeddings: Optional[str] = opt(None, "file of precomputed class-name embeddings (.safetensors with one tensor, "
                                          "or .npy): one row per class of data.classes, in that order")
    open_clip_model: Optional[str] = opt(None, "open_clip model name (e.g. ViT-B-16) whose text tower embeds the "
                                               "class names (needs samft[text] and model.text.checkpoint)")
    checkpoint: Optional[str] = opt(None, "local open_clip weights (.safetensors/.pt/.bin) for "
                                          "model.text.open_clip_model; nothing is downloaded")
    templates: list[str] = opt(SLIP_TEMPLATES, "prompt templates with one {} for the class name; each class's "
                                               "embedding is the normalised mean over them (default: SLIP's ImageNet "
                                               "ensemble)")

    @property
    def source(self) -> Optional[str]:
        """'file', 'open_clip' or None (no class-name embeddings configured)."""
        return "file" if self.embeddings else "open_clip" if self.open_clip_model else None


BRA_BLOCKS = ("global", "all")


@dataclass
class BRAConfig:
    """Options of ``model.attention=bra``: BiFormer's Bi-Level Routing Attention (samft/model/attention/bra.py)."""

    regions: int = opt(8, "regions per side S: the token map (or window) is split into S x S regions, padded "
                       "(padded keys masked) when S does not divide it", minimum=1)
    topk: int = opt(16, "key regions each query region attends to (at most regions**2, which is dense attention)",
                    minimum=1)
    lepe_kernel: int = opt(5, "kernel of the zero-initialised depthwise LEPE conv on v, added before proj "
                           "(odd; 0 = off)", minimum=0)
    blocks: str = opt("global", "blocks that use BRA: global (SAM's global-attention blocks; windowed blocks keep "
                      "their windows) or all (every block; windowed blocks route inside each window)", BRA_BLOCKS)

    def check(self, prefix: str) -> None:
        if self.topk > self.regions ** 2:
            raise ConfigError(f"{prefix}.topk: {self.topk} exceeds regions**2 = {self.regions ** 2} "
                              f"(the number of regions)")
        if self.lepe_kernel and self.lepe_kernel % 2 == 0:
            raise ConfigError(f"{prefix}.lepe_kernel: {self.lepe_kernel} is even; use an odd kernel or 0 (off)")


@dataclass
class ModelConfig:
    type: str = opt("vit_b", "SAM size: vit_b, vit_l, vit_h (official checkpoints) or tiny (CPU tests)", _model_types)
    checkpoint: Optional[str] = opt(
        None, "official SAM checkpoint (e.g. sam_vit_b_01ec64.pth); null = random weights (a warning is shown)"
    )
    img_size: int = opt(1024, "square input side (multiple of 16); pos_embed is interpolated when not 1024", minimum=16)
    seed: int = opt(0, "seed of the random base weights when checkpoint is null")
    pruned: Optional[str] = opt(None, "SPViT-pruned model (pruned.safetensors written by samft prune: the "
                                "architecture and the whole pruned state) that replaces the base; null = dense SAM")
    num_mask_tokens: int = opt(10, "multi-class: mask tokens (queries) decoded per image; binary models use one",
                               minimum=1)
    attention: str = opt("sdpa", "encoder attention implementation (samft/model/attention/): sdpa (fused "
                         "scaled_dot_product_attention), eager (segment_anything's own, the plain reference), bra "
                         "(BiFormer's Bi-Level Routing Attention: sparse, for 1536-2048 px; see model.bra)",
                         _attention_names)
    bra: BRAConfig = section(BRAConfig, "options of model.attention=bra (Bi-Level Routing Attention)")
    tiny: TinyConfig = section(TinyConfig, "sizes used when type is tiny")
    class_head: str = opt("linear", "multi-class: how mask tokens are classified: linear (a Linear to C+1 scores) or "
                          "text (cosine similarity to the class-name embeddings of model.text)", ("linear", "text"))
    text: TextConfig = section(TextConfig, "class-name embeddings (model.class_head=text, loss.clip.weight)")


DATA_FORMATS = ("auto", "folders", "csv", "pranet", "sinet", "isic", "sbu", "voc")


@dataclass
class DataConfig:
    format: str = opt("auto", "layout preset: auto (CSV when a split ends in .csv, else folders), folders, csv, "
                      "pranet, sinet, isic, sbu, voc (see samft/data/layouts.py)", DATA_FORMATS)
    root: str = opt(".", "dataset folder; relative split paths are resolved against it")
    train: Optional[str] = opt(None, "training split: folder, IMAGES::MASKS folders, CSV or VOC list "
                                     "(null = the format's default, e.g. TrainDataset)")
    val: Optional[str] = opt(None, "validation split; null = the format's (VOC: val) or hold out val_fraction")
    val_fraction: float = opt(0.1, "fraction of train held out for validation when there is no val split",
                              minimum=0.0)
    test: dict[str, str] = opt({}, "named test sets {name: split}; empty = the format's test sets "
                                   "(e.g. every TestDataset/ folder), else the validation split")
    image_dir: Optional[str] = opt(None, "sub-folder of a split holding the images (null = the format's)")
    mask_dir: Optional[str] = opt(None, "sub-folder of a split holding the masks (null = the format's)")
    mask_suffix: Optional[str] = opt(None, "added to an image's stem to name its mask (null = the format's, "
                                           "e.g. _segmentation for isic)")
    ignore: list[str] = opt([], "glob patterns of files to skip in image/mask folders (e.g. '*_superpixels.png')")
    check: str = opt("full", "checks before training: full (decode every file), quick (paths and sizes), off",
                     ("full", "quick", "off"))
    classes: list[str] = opt([], "class names, index = class id (background included); empty = binary masks")
    palette: list[list[int]] = opt([], "RGB colour of each class in colour-coded masks and predicted palette PNGs "
                                       "(empty = Pascal VOC's colour map)")
    ignore_index: int = opt(255, "class id excluded from the loss and the metrics (VOC's boundary)")
    background: Optional[int] = opt(0, "multi-class: class id of the background (left untinted in overlays, not "
                                        "'foreground' in data check); null = the data has no background class "
                                        "(e.g. CamVid's sky is class 0)")
    ignore_colors: list[list[int]] = opt([[224, 224, 192]], "colours of colour-coded masks mapped to ignore_index")
    split_seed: int = opt(0, "seed of the train/validation hold-out split")
    split_file: Optional[str] = opt(None, "a run's split.json (its train and validation file lists) to use as the "
                                          "train/val split instead of data.train/val/val_fraction")
    num_workers: int = opt(2, "data-loading worker processes (0 = load in the main process)", minimum=0)
    unlabelled: list[str] = opt([], "images without masks for the SSL loss (loss.ssl): folders, globs, CSV lists of "
                                    "images, or 'train' (the training images); empty = none")
    resize: Optional[str] = opt(None, "input geometry: pad (longest side to img_size, pad bottom/right; samft) or "
                                      "squash (resize to img_size x img_size, bicubic, ground truth nearest; "
                                      "AutoGluon); null = the protocol's", ("pad", "squash"))


@dataclass
class TrainConfig:
    epochs: int = opt(20, "number of passes over the training split", minimum=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = run all epochs)", minimum=0)
    batch_size: Optional[int] = opt(None, "images per forward pass (per process); null = the protocol's (samft 4, "
                                          "autogluon 1)", minimum=1)
    accum_steps: Optional[int] = opt(None, "forward passes accumulated per optimizer step; null = the protocol's "
                                           "(samft 1, autogluon 4)", minimum=1)
    lr: float = opt(1e-4, "peak AdamW learning rate", minimum=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", minimum=0.0)
    adam_eps: Optional[float] = opt(None, "AdamW eps; null = the protocol's (samft 1e-8, PyTorch's default; "
                                          "autogluon 1e-6)", minimum=0.0)
    schedule: Optional[str] = opt(None, "learning-rate decay after the warm-up: linear (to min_lr_ratio) or poly "
                                        "((1 - t)^poly_power, AutoGluon's polynomial_decay); null = the protocol's",
                                  ("linear", "poly"))
    poly_power: float = opt(1.0, "power of the poly schedule (AutoGluon: 1, the same curve as linear)", minimum=0.0)
    warmup_steps: int = opt(0, "linear warm-up steps before the linear decay", minimum=0)
    min_lr_ratio: float = opt(0.0, "learning rate at the end of the linear decay, as a fraction of lr", minimum=0.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", minimum=0.0)
    precision: str = opt("auto", "auto (bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU), bf16, fp16 "
                         "(with GradScaler) or fp32",
                         ("auto", "bf16", "fp16", "fp32"))
    compile: bool = opt(False, "torch.compile each encoder block (slow first steps; needs a C++ compiler on CPU "
                        "or Triton on CUDA)")
    grad_checkpointing: bool = opt(False, "recompute each encoder block's activations in the backward pass "
                                   "(non-reentrant checkpointing): much less memory, about 1/3 more time")
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    seed: int = opt(42, "seed of weights init, data order, augmentation and gate noise")
    metric: str = opt("auto", "validation metric that picks the best checkpoint (auto = Sm for binary, mIoU for "
                              "multi-class): an eval.json name (Sm, dice@0.5, meanDice, mIoU, ...) or its alias "
                              "(sm, dice, mdice, em, wfm, mae, ber, miou, ...)", ("auto",) + METRIC_CHOICES)
    val_every: int = opt(1, "validate every N epochs (the last epoch is always validated)", minimum=1)
    save_every: int = opt(100, "also save the resumable state every N optimizer steps (0 = epoch ends only)",
                          minimum=0)
    log_every: int = opt(10, "write a metrics.csv row every N optimizer steps", minimum=1)
    hflip: float = opt(0.5, "probability of the random horizontal flip", minimum=0.0)
    num_threads: int = opt(0, "CPU threads for torch (0 = torch's default: all cores; 1 = the safest on a machine "
                              "others share, see docs/performance.md)", minimum=0)
    progress: bool = opt(True, "show a progress bar")


@dataclass
class AuxLossConfig:
    """Weights of the named auxiliary losses the model produces (each logged as ``aux_<name>``)."""

    balance: Optional[float] = opt(None, "Conv-LoRA's expert balance loss; null = the protocol's (samft: 1.0 binary, "
                                         "2.0 multi-class, as the paper; autogluon: 1.0, as AutoGluon's code)",
                                   minimum=0.0)


@dataclass
class SetLossConfig:
    points: Optional[int] = opt(None, "mask BCE/Dice on this many points per matched mask, chosen by Mask2Former's "
                                      "importance sampling, and the matcher on as many random points (0 = every "
                                      "pixel); null = the protocol's (samft 0, autogluon 12544)", minimum=0)
    oversample: float = opt(3.0, "point sampling: candidates drawn per point (Mask2Former's oversample_ratio)",
                            minimum=1.0)
    importance: float = opt(0.75, "point sampling: fraction of the points taken from the most uncertain candidates "
                                  "(|logit| smallest), the rest uniform (Mask2Former's importance_sample_ratio)",
                            minimum=0.0)
    cost_class: Optional[float] = opt(None, "matcher cost weight of -p(class); null = the protocol's (samft: "
                                            "loss.class_weight, autogluon 1)", minimum=0.0)
    cost_mask: Optional[float] = opt(None, "matcher cost weight of the mask BCE; null = the protocol's (samft: "
                                           "loss.mask_bce_weight, autogluon 5)", minimum=0.0)
    cost_dice: Optional[float] = opt(None, "matcher cost weight of the mask Dice loss; null = the protocol's "
                                           "(samft: loss.mask_dice_weight, autogluon 5)", minimum=0.0)


@dataclass
class SSLLossConfig:
    """SimCLR's NT-Xent on two augmented views of unlabelled images (SLIP's SSL branch)."""

    weight: float = opt(0.0, "weight of the SSL loss in the total loss (0 = off: nothing extra is computed)",
                        minimum=0.0)
    temperature: float = opt(0.1, "NT-Xent softmax temperature", minimum=1e-6)
    mlp_dim: int = opt(4096, "hidden width of the projection MLP (thrown away after training)", minimum=1)
    emb_dim: int = opt(256, "output width of the projection MLP (the contrasted embedding)", minimum=1)
    batch_size: int = opt(8, "unlabelled images per forward pass and process (two views each)", minimum=2)


@dataclass
class ClipLossConfig:
    """Region-text loss: ground-truth class regions of the neck features against the class-name embeddings."""

    weight: float = opt(0.0, "weight of the region-text cross-entropy (0 = off; needs data.classes and model.text)",
                        minimum=0.0)


@dataclass
class LossConfig:
    bce: str = opt("mean", "BCE term: mean (paper/reference), weighted (PraNet's boundary weights) or balanced "
                           "(shadow detection, SAM-Adapter's balanced BCE)", ("mean", "weighted", "balanced"))
    iou: bool = opt(True, "add the boundary-weighted IoU term of the structure loss")
    class_weight: Optional[float] = opt(None, "multi-class: weight of the query classification cross-entropy; null = "
                                              "the protocol's (samft 10, autogluon 1)", minimum=0.0)
    mask_bce_weight: Optional[float] = opt(None, "multi-class: weight of the matched masks' BCE; null = the "
                                                 "protocol's (samft 5, autogluon 1)", minimum=0.0)
    mask_dice_weight: Optional[float] = opt(None, "multi-class: weight of the matched masks' Dice loss; null = the "
                                                  "protocol's (samft 5, autogluon 1)", minimum=0.0)
    no_object_weight: float = opt(0.1, "multi-class: cross-entropy weight of the 'no object' class", minimum=0.0)
    ignore_padding: bool = opt(True, "leave the padding added to make the input square out of the loss")
    set: SetLossConfig = section(SetLossConfig, "multi-class set loss: point sampling and matcher costs")
    aux: AuxLossConfig = section(AuxLossConfig, "weights of the model's named auxiliary losses")
    ssl: SSLLossConfig = section(SSLLossConfig, "self-supervised loss on data.unlabelled (SLIP's SimCLR)")
    clip: ClipLossConfig = section(ClipLossConfig, "region-text loss against class-name embeddings (SLIP's CLIP)")


@dataclass
class EvalConfig:
    threshold: float = opt(0.5, "probability threshold for dice@0.5/iou@0.5/BER and predicted masks", minimum=0.0)
    batch_size: int = opt(4, "images per forward pass during evaluation and prediction", minimum=1)
    resize_gt_to_input: Optional[bool] = opt(None, "score at img_size x img_size with the ground truth resized "
                                                   "(nearest) instead of at each image's original resolution; null = "
                                                   "the protocol's (samft false, autogluon true)")
    miou: Optional[str] = opt(None, "multi-class mIoU: dataset (classes absent from prediction and ground truth left "
                                    "out, ignore-labelled pixels nowhere) or per_class_all (AutoGluon: every class, "
                                    "absent ones 0, predictions on ignore-labelled pixels in the union); null = the "
                                    "protocol's", ("dataset", "per_class_all"))
    ber: Optional[str] = opt(None, "BER: pooled (counts summed over the set) or per_image (the mean of each image's "
                                   "BER, AutoGluon); null = the protocol's", ("pooled", "per_image"))


@dataclass
class OutputConfig:
    dir: Optional[str] = opt(None, "run directory (default runs/<config file name>)")
    overwrite: bool = opt(False, "allow training into a run directory that already holds a run")


@functools.lru_cache(maxsize=None)
def peft_config_cls() -> type:
    """The ``peft`` section's dataclass, built from the PEFT registry on first use (so that importing this
    module imports neither torch nor the methods)."""
    from samft.peft import registry

    specs = registry.all_methods()
    cls_fields: list[tuple[str, Any, Any]] = [
        ("method", str, opt("conv_lora", "PEFT method: " + ", ".join(specs), tuple(specs)))
    ]
    for name, spec in specs.items():
        cls_fields.append((name, spec.config_cls, section(spec.config_cls, f"options of {name}")))
    return dataclasses.make_dataclass("PeftConfig", cls_fields)


def __getattr__(name: str) -> Any:  # ``samft.config.PeftConfig`` still names the section's class
    if name == "PeftConfig":
        return peft_config_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Config:
    protocol: str = opt("samft", "samft or autogluon (the reference implementation): the value of every option left "
                                 "null that the two treat differently (see samft/config/protocol.py and the README's "
                                 "'Reproducing the paper')", PROTOCOLS)
    model: ModelConfig = section(ModelConfig, "SAM size, checkpoint and input size")
    peft: PeftConfig = dataclasses.field(default_factory=lambda: peft_config_cls()(),  # noqa: F821 (lazy)
                                         metadata={"help": "parameter-efficient fine-tuning method and its options"})
    data: DataConfig = section(DataConfig, "dataset layout and splits")
    train: TrainConfig = section(TrainConfig, "optimisation and schedule")
    loss: LossConfig = section(LossConfig, "loss terms")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    output: OutputConfig = section(OutputConfig, "where the run is written")

    def __post_init__(self) -> None:
        apply_protocol(self)  # every Config is resolved, however it was built

    @property
    def method_cfg(self) -> Any:
        """The options section of the active PEFT method."""
        return getattr(self.peft, self.peft.method)


# ---------------------------------------------------------------------------------------------
# Loading, coercion and validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _from_dict(tp, value, key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in a config dataclass


_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _yaml_bool_word(value: Any, field: dataclasses.Field) -> Any:
    """YAML 1.1 reads ``off``/``on``/``no``/``yes`` as booleans: give a choice field its word back."""
    choices = field.metadata.get("choices")
    if isinstance(value, bool) and choices is not None and not callable(choices):
        for word in _BOOL_WORDS[value]:
            if word in choices:
                return word
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, localns={"PeftConfig": peft_config_cls()} if cls is Config else None)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown config key '{dotted}'{hint}; valid keys here: {valid}")
        field = next(f for f in fields(cls) if f.name == key)
        kwargs[key] = _coerce(_yaml_bool_word(value, field), hints[key], dotted)
    obj = cls(**kwargs)
    return obj


def _validate(obj: Any, prefix: str = "") -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(value):
            _validate(value, dotted)
            continue
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = tuple(choices())
        if choices is not None and value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")
        _require_finite(value, dotted)
        minimum = f.metadata.get("minimum")
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError(f"{dotted}: {value!r} is below the minimum {minimum}")


def _require_finite(value: Any, key: str) -> None:
    """Every float of the config (in lists and mappings too) is a finite number: NaN and inf are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _require_finite(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _require_finite(v, f"{key}.{k}")


def validate(cfg: Config) -> Config:
    """Check choices, minimums and the rules that tie fields together."""
    _validate(cfg)
    if cfg.model.img_size % 16:
        raise ConfigError(f"model.img_size: {cfg.model.img_size} is not a multiple of 16 (the patch size)")
    if not 0.0 <= cfg.loss.set.importance <= 1.0:
        raise ConfigError(f"loss.set.importance: {cfg.loss.set.importance} must be in [0, 1]")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {cfg.data.val_fraction} must be in [0, 1)")
    d = cfg.data
    if d.palette and len(d.palette) != len(d.classes):
        raise ConfigError(f"data.palette: {len(d.palette)} colours for {len(d.classes)} classes in data.classes")
    for key, colours in (("data.palette", d.palette), ("data.ignore_colors", d.ignore_colors)):
        for c in colours:
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise ConfigError(f"{key}: {c} is not an RGB colour (three values 0..255)")
    if d.classes and 0 <= d.ignore_index < len(d.classes):
        raise ConfigError(f"data.ignore_index: {d.ignore_index} is a class id of data.classes "
                          f"({d.classes[d.ignore_index]!r}); use an id outside 0..{len(d.classes) - 1}")
    if d.classes and d.background is not None and not 0 <= d.background < len(d.classes):
        raise ConfigError(f"data.background: {d.background} is not a class id of data.classes (0..{len(d.classes) - 1}); "
                          f"null = no background class")
    if len(d.classes) == 1:
        raise ConfigError("data.classes: one class is a binary task; leave data.classes empty for binary masks")
    metric = cfg.train.metric
    if metric != "auto" and canonical(metric) not in task_metric_names(bool(d.classes)):
        kind = "multi-class" if d.classes else "binary"
        raise ConfigError(f"train.metric: {metric!r} is not a {kind} metric; choose from "
                          f"{', '.join(task_metric_names(bool(d.classes)))}")
    cfg.model.bra.check("model.bra")
    cfg.model.tiny.check("model.tiny")  # checked whether used or not: its defaults are valid
    from samft.peft import registry

    for name, spec in registry.all_methods().items():
        spec.validate(getattr(cfg.peft, name), f"peft.{name}")
    _validate_slip(cfg)
    return cfg


def _validate_slip(cfg: Config) -> None:
    """The SSL and language options: what each needs, and sources that exclude each other."""
    if cfg.loss.ssl.weight > 0 and not cfg.data.unlabelled:
        raise ConfigError(f"loss.ssl.weight: {cfg.loss.ssl.weight} needs unlabelled images in data.unlabelled "
                          f"(folders, globs, CSV lists or 'train')")
    from samft.peft import registry

    spec = registry.get(cfg.peft.method)
    for key, weight in (("loss.ssl.weight", cfg.loss.ssl.weight), ("loss.clip.weight", cfg.loss.clip.weight)):
        if weight > 0 and not (spec.adapts_encoder or spec.trains_base):
            raise ConfigError(f"{key}: {weight} trains the image encoder, but peft.method={cfg.peft.method} "
                              f"leaves it frozen: the loss could only train its own projection head")
    text = cfg.model.text
    if text.embeddings and text.open_clip_model:
        raise ConfigError("model.text: set either embeddings (a file) or open_clip_model (with checkpoint), not both")
    if text.open_clip_model and not text.checkpoint:
        raise ConfigError(f"model.text.checkpoint: open_clip_model {text.open_clip_model!r} needs a local checkpoint "
                          f"file (samft downloads nothing)")
    if text.checkpoint and not text.open_clip_model:
        raise ConfigError("model.text.open_clip_model: model.text.checkpoint is set but no open_clip model name")
    for t in text.templates:
        if t.count("{}") != 1:
            raise ConfigError(f"model.text.templates: {t!r} must contain exactly one {{}} (the class name)")
    if not text.templates:
        raise ConfigError("model.text.templates: empty; give at least one template such as 'a photo of a {}.'")
    users = [key for key, on in (("model.class_head=text", cfg.model.class_head == "text"),
                                 (f"loss.clip.weight={cfg.loss.clip.weight}", cfg.loss.clip.weight > 0)) if on]
    for user in users:
        if not cfg.data.classes:
            raise ConfigError(f"{user}: needs class names in data.classes (a multi-class task)")
        if text.source is None:
            raise ConfigError(f"{user}: needs class-name embeddings: model.text.embeddings (a file) or "
                              f"model.text.open_clip_model with model.text.checkpoint")


def unused_option_warnings(cfg: Config) -> list[str]:
    """One line per SLIP option that is set but has no effect (for the loop to warn about)."""
    out = []
    if cfg.data.unlabelled and cfg.loss.ssl.weight == 0:
        out.append(f"data.unlabelled lists {len(cfg.data.unlabelled)} source(s) but loss.ssl.weight is 0: "
                   f"the unlabelled images are not used")
    if cfg.model.text.source and cfg.model.class_head != "text" and cfg.loss.clip.weight == 0:
        out.append("model.text is set but neither model.class_head=text nor loss.clip.weight > 0 uses it")
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key=value`` into the nested mapping ``data`` (validated later with the rest)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


# keys renamed since an earlier version: old dotted key -> new one (old run directories still load)
RENAMED = {("loss", "balance_weight"): ("loss", "aux", "balance")}


def _migrate(data: dict) -> dict:
    for old, new in RENAMED.items():
        node = data
        for part in old[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and old[-1] in node:
            value = node.pop(old[-1])
            target = data
            for part in new[:-1]:
                target = target.setdefault(part, {})
            target.setdefault(new[-1], value)
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    data = _migrate(apply_overrides(json.loads(json.dumps(data or {})), overrides or []))
    return validate(_from_dict(Config, data))


def _blame(data: dict, overrides: list[str] | None, message: str, path: Path) -> str:
    """Where an error comes from: the file when the file alone has it, else the command line."""
    if not overrides:
        return str(path)
    try:
        config_from_dict(data)
    except ConfigError as e:
        if str(e) == message:
            return str(path)
    return "command line (key=value)"
def yaml_error(e: Exception) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    context = getattr(e, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}" + (f" ({' '.join(context.split())})" if context else "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config strictly, apply overrides, validate, and default ``output.dir``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, peft:, ...), got {type(data).__name__}")
    try:
        cfg = config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{_blame(data, overrides, str(e), path)}: {e}") from None
    if cfg.output.dir is None:
        cfg.output.dir = str(Path("runs") / path.stem)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain mapping of the config; ``peft`` keeps only the active method's section."""
    out = dataclasses.asdict(cfg)
    out["peft"] = {"method": cfg.peft.method, cfg.peft.method: out["peft"][cfg.peft.method]}
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    """Short hash of the resolved config (recorded in eval.json)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for docs and ``samft info``."""
    rows = []
    for f in fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            rows.extend(describe_fields(type(default), dotted))
        else:
            rows.append((dotted, repr(default), f.metadata.get("help", "")))
    return rows
