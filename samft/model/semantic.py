"""SemanticSAM: SAM as an end-to-end semantic-segmentation model with a constant prompt.

    image (B, 3, H, W), normalised, H and W multiples of 16
      -> image encoder (frozen, PEFT-adapted)           -> embeddings (B, C, H/16, W/16)
      -> constant prompt: no points/boxes (sparse (B, 0, C)), dense = the prompt encoder's no_mask_embed
      -> mask decoder, batched over images               -> mask logits (B, Q, H/4, W/4)
                                                           (+ class logits (B, Q, K+1) when multi-class)

SAM's ``MaskDecoder.predict_masks`` repeats the image embeddings once per prompt (one image, many
prompts); here every image has exactly one constant prompt, so :class:`SemanticMaskDecoder` runs the
decoder's own sub-modules (two-way transformer, upscaling, a hypernetwork MLP) on the whole batch.
The IoU token is kept as an input token (it takes part in the token attention, as in SAM) but SAM's
IoU head and the other multimask tokens are dropped.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn
from torch.utils.checkpoint import checkpoint

from samft.model.encoder import embed, neck
from samft.tasks.task import semantic_probs, upsample_logits  # noqa: F401  (re-exported)
from samft.tasks.terms import active_aux_sink, aux_sink


def _aux_name(module: nn.Module) -> str:
    return getattr(module, "aux_name", "") or ""


class SegOutput(NamedTuple):
    masks: torch.Tensor  # (B, Q, H/4, W/4) mask logits
    class_logits: Optional[torch.Tensor]  # (B, Q, K+1) or None for binary models
    aux_losses: dict[str, torch.Tensor]  # named scalar auxiliary losses (Conv-LoRA's "balance", ...)
    features: Optional[torch.Tensor] = None  # (B, C, H/16, W/16) the neck features (SLIP's region-text loss)
    class_scores: Optional[torch.Tensor] = None  # (B, C, H, W) class scores already formed at the input size (an
    # exported graph's output, samft.engine.artifacts.onnx_model): used instead of masks + class_logits

    @property
    def aux_loss(self) -> torch.Tensor:
        """The unweighted sum of the auxiliary losses (0 when none)."""
        total = self.masks.new_zeros((), dtype=torch.float32)
        for value in self.aux_losses.values():
            total = total + value
        return total


class SemanticMaskDecoder(nn.Module):
    """SAM's mask decoder decoding a batch of images with ``num_queries`` mask tokens.

    Every mask token starts as SAM's mask token 0 and all share one hypernetwork MLP (initialised from
    SAM's hypernetwork 0). With ``num_classes > 1`` a Linear on each output mask token gives
    ``num_classes + 1`` class scores (the last is "no object").
    """

    def __init__(self, decoder: MaskDecoder, num_queries: int = 1, num_classes: int = 1) -> None:
        super().__init__()
        dim = decoder.transformer_dim
        self.num_queries = num_queries
        self.transformer = decoder.transformer
        self.iou_token = decoder.iou_token
        self.mask_tokens = nn.Embedding(num_queries, dim)
        with torch.no_grad():
            self.mask_tokens.weight.copy_(decoder.mask_tokens.weight[0].expand(num_queries, -1))
        self.output_upscaling = decoder.output_upscaling
        self.hypernetwork = copy.deepcopy(decoder.output_hypernetworks_mlps[0])
        self.class_head = nn.Linear(dim, num_classes + 1) if num_classes > 1 else None

    def leading_tokens(self) -> list[torch.Tensor]:
        """The tokens before the mask tokens: SAM's IoU token."""
        return [self.iou_token.weight]

    def tokens(self, batch: int, sparse: Optional[torch.Tensor]) -> torch.Tensor:
        """The decoder's input tokens (B, T, C): :meth:`leading_tokens`, the mask tokens, then ``sparse`` (1, S, C)."""
        parts = self.leading_tokens() + [self.mask_tokens.weight] + ([sparse[0]] if sparse is not None else [])
        return torch.cat(parts, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def upscale(self, src: torch.Tensor, high_res: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """(B, C, h, w) -> (B, C/8, 4h, 4w) by SAM's output upscaling."""
        return self.output_upscaling(src)

    def forward(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_embeddings: torch.Tensor,
        sparse: Optional[torch.Tensor] = None, high_res: Optional[list[torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """embeddings (B, C, h, w), pe (1, C, h, w), dense (1, C, 1, 1), optional constant sparse prompt
        tokens (1, S, C) and high-resolution maps -> masks (B, Q, 4h, 4w), classes."""
        b, c, h, w = image_embeddings.shape
        tokens = self.tokens(b, sparse)
        src = image_embeddings + dense_embeddings
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        first = sum(t.shape[0] for t in self.leading_tokens())
        mask_tokens_out = hs[:, first : first + self.num_queries, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.upscale(src, high_res)
        hyper = self.hypernetwork(mask_tokens_out)  # (B, Q, C/8)
        _, c8, uh, uw = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c8, uh * uw)).reshape(b, self.num_queries, uh, uw)
        class_logits = self.class_head(mask_tokens_out) if self.class_head is not None else None
        return masks, class_logits


class SemanticSAM(nn.Module):
    """SAM turned into a semantic-segmentation model (see the module docstring)."""

    family = "sam"  # model.family (SemanticSAM2: sam2)

    def __init__(self, sam: Sam, num_queries: int = 1, num_classes: int = 1) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.decoder = SemanticMaskDecoder(sam.mask_decoder, num_queries, num_classes)
        self.num_classes = num_classes
        self.grad_checkpointing = False  # non-reentrant activation checkpointing of the encoder blocks

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def feature_channels(self) -> int:
        """Channels of the embeddings the decoder reads (``SegOutput.features``, ``encode``): the neck's output."""
        return self.image_encoder.neck[0].out_channels

    def freeze_base(self) -> None:
        """Freeze the image and prompt encoders; the decoder stays trainable."""
        self.image_encoder.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)
        self.decoder.requires_grad_(True)

    @property
    def aux_loss_names(self) -> list[str]:
        """Names of the auxiliary losses this model's modules can produce (a module's ``aux_name``)."""
        return sorted({_aux_name(m) for m in self.image_encoder.modules() if _aux_name(m)})

    @staticmethod
    def _run_block(blk: nn.Module, collect: bool, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """One block in its own aux-loss sink (``collect=False``: none, so its layers compute nothing extra);
        returns its output and the (name, value) auxiliary losses its layers added, in order."""
        with aux_sink(collect) as sink:
            y = blk(x)
        return y, (sink.added if sink is not None else [])

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/16, W/16), with pos_embed interpolated to any token grid.

        The layers add their auxiliary losses to the open aux-loss sink, if any (:meth:`forward` opens one;
        a bare ``encode``, e.g. SLIP's SSL pass, computes none). With ``grad_checkpointing`` (in training)
        each block runs under non-reentrant ``torch.utils.checkpoint``: its activations are recomputed in
        the backward pass. The checkpointed function opens the block's own sink and returns its values as
        outputs (so they are part of the checkpointed graph and get exact gradients, and the sums are those
        of a run without checkpointing, bit for bit); the recomputation in
        backward opens a fresh sink whose values are dropped, and it runs with the same ``collect`` flag, so
        it computes what the forward computed. The recomputation restores the RNG state, so Conv-LoRA's gate
        noise and expert choices are the same as in the forward pass. The leading blocks that carry nothing
        trainable (:meth:`frozen_prefix`) run first, under ``torch.no_grad()`` and without checkpointing.
        """
        return self.encode_levels(images)[0]

    taps: frozenset = frozenset()  # blocks whose outputs the neck reads besides the last one's (Hiera's stages)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the tokens the first block takes (B, h, w, C)."""
        return embed(self.image_encoder, images)

    def levels(self, x: torch.Tensor, tapped: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[list]]:
        """The last block's output (and the ``taps``' outputs) -> (the decoder's image embeddings, its
        high-resolution maps or None)."""
        return neck(self.image_encoder, x), None

    def encode_levels(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[list]]:
        """:meth:`encode` and the high-resolution maps the decoder also reads (None for SAM 1)."""
        x = self.embed(images)
        frozen = self.frozen_prefix(x)
        outer = active_aux_sink()
        checkpointing = self._checkpointing()
        tapped = []
        for i, blk in enumerate(self.image_encoder.blocks):
            if i < frozen:
                with torch.no_grad():
                    x = blk(x)
            elif checkpointing:
                x, aux = checkpoint(self._run_block, blk, outer is not None, x, use_reentrant=False)
                if outer is not None:
                    outer.extend(aux)
            else:
                x = blk(x)
            if i in self.taps:
                tapped.append(x)
        return self.levels(x, tapped)

    def prompt(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The constant prompt at ``emb``'s grid: (dense PE (1, C, h, w), dense embedding (1, C, 1, 1), sparse
        tokens (1, S, C) or None): SAM's no-mask embedding and no points or boxes."""
        h, w = emb.shape[-2:]
        pe = self.prompt_encoder.pe_layer((h, w)).unsqueeze(0).to(emb.dtype)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(emb.dtype)
        return pe, dense, None

    def frozen_prefix(self, x: torch.Tensor) -> int:
        """How many leading encoder blocks need no autograd graph for the embedded tokens ``x``: those before the
        first block holding a trainable parameter (``peft.blocks=late:K``; every block for ``decoder_only``),
        when gradients are on and ``x`` needs none. :meth:`encode` runs them under ``torch.no_grad()`` and
        outside activation checkpointing: nothing is stored for their backward, and their output is the same."""
        if not torch.is_grad_enabled() or x.requires_grad:
            return 0
        count = 0
        for blk in self.image_encoder.blocks:
            if any(p.requires_grad for p in blk.parameters()):
                break
            count += 1
        return count

    def forward(self, images: torch.Tensor) -> SegOutput:
        """The masks (and class logits) of ``images``, with the named auxiliary losses of this forward pass
        (every name of :attr:`aux_loss_names`, zero when no layer added it)."""
        with aux_sink() as sink:
            emb, high_res = self.encode_levels(images)
        pe, dense, sparse = self.prompt(emb)
        masks, class_logits = self.decoder(emb, pe, dense, sparse, high_res)
        aux = {name: masks.new_zeros((), dtype=torch.float32) for name in self.aux_loss_names}
        for name, value in sink.values.items():
            aux[name] = aux[name] + value if name in aux else value
        return SegOutput(masks, class_logits, aux, emb)


def logits_to_original(logits: torch.Tensor, input_size: int, valid_hw: tuple[int, int],
                       orig_hw: tuple[int, int]) -> torch.Tensor:
    """One image's (Q, h, w) logits -> (Q, H, W) at its original size: upsample, crop padding, resize."""
    x = upsample_logits(logits.unsqueeze(0), (input_size, input_size))
    x = x[..., : valid_hw[0], : valid_hw[1]]
    return upsample_logits(x, tuple(orig_hw))[0]


def image_scores(task: Any, out: SegOutput, j: int, img_size: int, valid_hw: list[int], size: list[int]) -> torch.Tensor:
    """Image ``j`` of a batch's outputs -> the task's per-pixel scores at ``size`` (padding cropped). Class scores
    formed already (``out.class_scores``) are cropped and resized as they are."""
    if out.class_scores is not None:
        return logits_to_original(out.class_scores[j], img_size, valid_hw, size)
    logits = logits_to_original(out.masks[j], img_size, valid_hw, size)
    return task.scores(logits, None if out.class_logits is None else out.class_logits[j])
