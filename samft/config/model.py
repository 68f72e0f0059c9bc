"""The ``model`` section: SAM's size, checkpoint and input size; the tiny sizes, BRA's options and the
class-name embeddings of the text class head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from samft.config.field import opt, section
from samft.config.names import ATTENTIONS, FAMILIES, FAMILY_TYPES, SAM2_TYPES, SAM_TYPES
from samft.errors import ConfigError


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


@dataclass
class TinyHieraConfig:
    """Sizes of the small SAM 2.1 (Hiera trunk, FPN neck, SAM 2 mask decoder) built from the real classes."""

    embed_dim: int = opt(16, "width of the first Hiera stage (doubles at each stage)", minimum=2)
    num_heads: int = opt(1, "heads of the first stage (doubles at each stage)", minimum=1)
    stages: list[int] = opt([1, 1, 2, 1], "Hiera blocks per stage (four stages; q-pooling at the first three changes)")
    global_att_blocks: list[int] = opt([3], "Hiera blocks with global attention (the others are windowed)")
    window_spec: list[int] = opt([4, 2, 4, 2], "window size per stage; the first one is also the windowed "
                                               "position embedding's size")
    window_pos_embed: int = opt(4, "side of the background position embedding (interpolated to the grid)", minimum=1)
    d_model: int = opt(32, "FPN neck = mask decoder width (divisible by 16; the decoder's other sizes are "
                           "SAM2Base's own: 2 layers, MLP 2048, 8 heads)", minimum=16)

    def check(self, prefix: str) -> None:
        if len(self.stages) != 4 or min(self.stages) < 1:
            raise ConfigError(f"{prefix}.stages: {self.stages}: four stages of at least one block each")
        if len(self.window_spec) != 4 or min(self.window_spec) < 1:
            raise ConfigError(f"{prefix}.window_spec: {self.window_spec}: four window sizes of at least 1")
        if self.d_model % 16:
            raise ConfigError(f"{prefix}.d_model: {self.d_model} is not divisible by 16 (8 decoder heads on "
                              f"d_model/2)")
        bad = [i for i in self.global_att_blocks if not 0 <= i < sum(self.stages)]
        if bad:
            raise ConfigError(f"{prefix}.global_att_blocks: {bad} outside 0..{sum(self.stages) - 1}")


# the first window size of each official SAM 2.1 size (the windowed position embedding's side)
SAM2_FIRST_WINDOW = 8


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

    def check(self, prefix: str) -> None:
        """One source of embeddings, complete; templates with exactly one {} each."""
        if self.embeddings and self.open_clip_model:
            raise ConfigError(f"{prefix}: set either embeddings (a file) or open_clip_model (with checkpoint), not both")
        if self.open_clip_model and not self.checkpoint:
            raise ConfigError(f"{prefix}.checkpoint: open_clip_model {self.open_clip_model!r} needs a local "
                              f"checkpoint file (samft downloads nothing)")
        if self.checkpoint and not self.open_clip_model:
            raise ConfigError(f"{prefix}.open_clip_model: {prefix}.checkpoint is set but no open_clip model name")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ConfigError(f"{prefix}.templates: {t!r} must contain exactly one {{}} (the class name)")
        if not self.templates:
            raise ConfigError(f"{prefix}.templates: empty; give at least one template such as 'a photo of a {{}}.'")


BRA_BLOCKS = ("global", "all")
DECODER_MODES = ("full", "frozen", "peft")
QUANTIZE = ("none", "nf4", "int8")


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
    family: str = opt("sam", "model family: sam (SAM 1, ViT encoder) or sam2 (SAM 2.1, Hiera encoder)", FAMILIES)
    type: str = opt("vit_b", "size: vit_b, vit_l, vit_h for family sam; hiera_t, hiera_s, hiera_b+, hiera_l for "
                    "family sam2 (official checkpoints); tiny (CPU tests, either family)",
                    tuple(dict.fromkeys(SAM_TYPES + SAM2_TYPES)))
    checkpoint: Optional[str] = opt(
        None, "official checkpoint (e.g. sam_vit_b_01ec64.pth, sam2.1_hiera_base_plus.pt); null = random weights "
              "(a warning is shown)"
    )
    img_size: int = opt(1024, "square input side: a multiple of 16 (sam) or of 32 (sam2); position embeddings are "
                        "interpolated when not 1024", minimum=16)
    seed: int = opt(0, "seed of the random base weights when checkpoint is null")
    pruned: Optional[str] = opt(None, "SPViT-pruned model (pruned.safetensors written by samft prune: the "
                                "architecture and the whole pruned state) that replaces the base; null = dense SAM")
    num_mask_tokens: int = opt(10, "multi-class: mask tokens (queries) decoded per image; binary models use one",
                               minimum=1)
    attention: str = opt("sdpa", "encoder attention implementation (samft/model/attention/): sdpa (fused "
                         "scaled_dot_product_attention), eager (segment_anything's own, the plain reference), bra "
                         "(BiFormer's Bi-Level Routing Attention: sparse, for 1536-2048 px; see model.bra)",
                         ATTENTIONS)
    bra: BRAConfig = section(BRAConfig, "options of model.attention=bra (Bi-Level Routing Attention)")
    tiny: TinyConfig = section(TinyConfig, "sizes used when type is tiny (family sam)")
    tiny_hiera: TinyHieraConfig = section(TinyHieraConfig, "sizes used when type is tiny (family sam2)")
    class_head: str = opt("linear", "multi-class: how mask tokens are classified: linear (a Linear to C+1 scores) or "
                          "text (cosine similarity to the class-name embeddings of model.text)", ("linear", "text"))
    text: TextConfig = section(TextConfig, "class-name embeddings (model.class_head=text, loss.clip.weight)")
    decoder: str = opt("full", "how the mask decoder trains: full (every weight), frozen (SAM's weights stay; the "
                       "class head and, with several queries, the mask tokens train) or peft (frozen + LoRA on the "
                       "q_proj/v_proj of its attention layers, as finetune-SAM)", DECODER_MODES, hash_default=False)
    decoder_rank: int = opt(4, "model.decoder=peft: rank of the decoder's LoRA", minimum=1, hash_default=False)
    decoder_alpha: float = opt(4.0, "model.decoder=peft: the decoder's LoRA is scaled by alpha / rank", minimum=0.0,
                               hash_default=False)
    quantize: str = opt("none", "the frozen image encoder's linear weights stored as nf4 (4-bit NormalFloat, QLoRA) or "
                        "int8 through bitsandbytes; none keeps float32", QUANTIZE, hash_default=False)

    def check(self, prefix: str) -> None:
        """The input size, BRA's options and the tiny sizes (checked whether used or not: their defaults are
        valid). ``text`` is checked with the rest of SLIP (samft/config/slip.py)."""
        if self.type not in FAMILY_TYPES[self.family]:
            raise ConfigError(f"{prefix}.type: {self.type!r} is not a size of family {self.family!r} "
                              f"({prefix}.family); choose from {', '.join(FAMILY_TYPES[self.family])}")
        if self.img_size % 16:
            raise ConfigError(f"{prefix}.img_size: {self.img_size} is not a multiple of 16 (the patch size)")
        self.bra.check(f"{prefix}.bra")
        self.tiny.check(f"{prefix}.tiny")
        self.tiny_hiera.check(f"{prefix}.tiny_hiera")
        if self.family == "sam2":
            self._check_sam2(prefix)

    def _check_sam2(self, prefix: str) -> None:
        """What SAM 2.1 cannot do: the input side, BRA, SPViT pruning."""
        step = sam2_size_step(self)
        if self.img_size % step:
            raise ConfigError(f"{prefix}.img_size: {self.img_size} is not a multiple of {step}, which SAM 2.1 "
                              f"{self.type} needs (stride 32 after Hiera's three q-poolings, and the windowed "
                              f"position embedding tiles the stride-4 grid)")
        if self.attention == "bra":
            raise ConfigError(f"{prefix}.attention: bra is not available for {prefix}.family=sam2 (Hiera's "
                              f"q-pooling attention is not routed); use sdpa or eager")
        if self.pruned:
            raise ConfigError(f"{prefix}.pruned: SPViT pruning is for SAM 1 only, not {prefix}.family=sam2")


# PEFT methods SAM 2.1 cannot take, with the reason (peft.method is checked against model.family)
SAM1_ONLY_METHODS = {
    "sam_adapter": "its prompts are added before every block at the ViT's one width and 16-px patch grid, while "
                   "Hiera's blocks change width and grid at each stage",
}


def check_family_method(model: ModelConfig, method: str) -> None:
    """One line when ``peft.method`` has no meaning on ``model.family``."""
    if model.family == "sam2" and method in SAM1_ONLY_METHODS:
        raise ConfigError(f"peft.method: {method} is not available for model.family=sam2: {SAM1_ONLY_METHODS[method]}")


# PEFT methods that keep the encoder's linear weights frozen and wrap them, so that these can be quantised
QUANTIZABLE_METHODS = ("lora", "conv_lora", "decoder_only", "hf")
# HF peft's types that only call their base layer (the others read its weight, which is packed when quantised)
HF_QUANTIZABLE_TYPES = ("lora", "dora", "ia3", "fourierft", "randlora")


def check_quantize(model: ModelConfig, method: str, init: str, hf_type: str = "lora") -> None:
    """One line when ``model.quantize`` cannot go with the family, a pruned model, the method, its ``init`` or (HF
    peft) its type."""
    if model.quantize == "none":
        return
    key = f"model.quantize={model.quantize}"
    if model.family != "sam":
        raise ConfigError(f"{key}: quantising is for SAM 1's encoder (model.family=sam) only")
    if model.pruned:
        raise ConfigError(f"{key}: a pruned encoder (model.pruned) is not quantised; use model.quantize=none")
    if method not in QUANTIZABLE_METHODS:
        raise ConfigError(f"{key}: peft.method={method} is not available on quantised linear weights (full, bitfit "
                          f"and ssf train or fold into them; adapter, vpt and sam_adapter are not built for it yet); use one of "
                          f"{', '.join(QUANTIZABLE_METHODS)}")
    if method == "hf" and hf_type not in HF_QUANTIZABLE_TYPES:
        raise ConfigError(f"{key}: peft.hf.type={hf_type} reads its base layer's weight, which is packed when "
                          f"quantised; use one of {', '.join(HF_QUANTIZABLE_TYPES)}")
    if init != "default":
        raise ConfigError(f"{key}: peft.{method}.init={init} rewrites the frozen weight to its residual, which a "
                          f"quantised weight cannot hold; use init=default")


def sam2_size_step(cfg: ModelConfig) -> int:
    """The multiple of which a SAM 2.1 input side must be: 32 (the stride-32 stage and the FPN's 2x steps)
    and 4 x the first window size (the windowed position embedding tiles the stride-4 grid)."""
    import math

    first = cfg.tiny_hiera.window_spec[0] if cfg.type == "tiny" else SAM2_FIRST_WINDOW
    return math.lcm(32, 4 * first)
