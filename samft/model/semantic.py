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
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from samft.model.encoder import embed, neck
from samft.tasks.task import semantic_probs  # noqa: F401  (re-exported)


def _aux_name(module: nn.Module) -> str:
    return getattr(module, "aux_name", "") or ""


class SegOutput(NamedTuple):
    masks: torch.Tensor  # (B, Q, H/4, W/4) mask logits
    class_logits: Optional[torch.Tensor]  # (B, Q, K+1) or None for binary models
    aux_losses: dict[str, torch.Tensor]  # named scalar auxiliary losses (Conv-LoRA's "balance", ...)
    features: Optional[torch.Tensor] = None  # (B, C, H/16, W/16) the neck features (SLIP's region-text loss)

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

    def forward(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """embeddings (B, C, h, w), pe (1, C, h, w), dense (1, C, 1, 1) -> masks (B, Q, 4h, 4w), classes."""
        b, c, h, w = image_embeddings.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        src = image_embeddings + dense_embeddings
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + self.num_queries, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        hyper = self.hypernetwork(mask_tokens_out)  # (B, Q, C/8)
        _, c8, uh, uw = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c8, uh * uw)).reshape(b, self.num_queries, uh, uw)
        class_logits = self.class_head(mask_tokens_out) if self.class_head is not None else None
        return masks, class_logits


class SemanticSAM(nn.Module):
    """SAM turned into a semantic-segmentation model (see the module docstring)."""

    def __init__(self, sam: Sam, num_queries: int = 1, num_classes: int = 1) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.decoder = SemanticMaskDecoder(sam.mask_decoder, num_queries, num_classes)
        self.num_classes = num_classes
        self.grad_checkpointing = False  # non-reentrant activation checkpointing of the encoder blocks
        self._aux_modules: list[nn.Module] = []
        self._block_aux_modules: list[list[nn.Module]] = []
        self._aux_names: list[str] = []
        self._pending_aux: list[torch.Tensor] = []  # (len(aux_names),) losses returned by checkpointed blocks

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def freeze_base(self) -> None:
        """Freeze the image and prompt encoders; the decoder stays trainable."""
        self.image_encoder.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)
        self.decoder.requires_grad_(True)

    def refresh_aux_modules(self) -> None:
        """Remember which modules produce an auxiliary loss (call after the encoder's modules change).

        A module produces one when it has a non-empty ``aux_name`` (Conv-LoRA's layers: ``balance``) and
        stores the loss in ``aux_loss`` during forward; it is cleared when collected.
        """
        self._aux_modules = [m for m in self.image_encoder.modules() if _aux_name(m)]
        self._block_aux_modules = [[m for m in blk.modules() if _aux_name(m)] for blk in self.image_encoder.blocks]
        self._aux_names = sorted({_aux_name(m) for m in self._aux_modules})

    @property
    def aux_loss_names(self) -> list[str]:
        """Names of the auxiliary losses this model's modules can produce."""
        return list(self._aux_names)

    @staticmethod
    def _run_block(blk: nn.Module, aux_modules: list[nn.Module], names: list[str], x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block, returning its modules' auxiliary losses (float32, one per name) with its output."""
        y = blk(x)
        aux = [y.new_zeros((), dtype=torch.float32) for _ in names]
        for m in aux_modules:
            if m.aux_loss is not None:
                i = names.index(m.aux_name)
                aux[i] = aux[i] + m.aux_loss.float()
                m.aux_loss = None
        return y, torch.stack(aux) if aux else y.new_zeros(0, dtype=torch.float32)

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/16, W/16), with pos_embed interpolated to any token grid.

        With ``grad_checkpointing`` (in training) each block runs under non-reentrant
        ``torch.utils.checkpoint``: its activations are recomputed in the backward pass. A block's
        auxiliary (balance) losses are then returned as an output of the checkpointed function instead
        of being left on the modules, so that (1) they are part of the checkpointed graph and get exact
        gradients, and (2) the recomputation in backward, which runs the layers again, leaves no stale
        loss (and the graph it holds) on the modules. For (2) the recomputation runs each block to its
        end (checkpoint "early stop" off: it would otherwise stop inside the block, after a layer has
        stored its loss and before ``_run_block`` clears it). The recomputation restores the RNG state,
        so Conv-LoRA's gate noise and expert choices are the same as in the forward pass.
        """
        enc = self.image_encoder
        x = embed(enc, images)
        checkpointing = self._checkpointing()
        self._pending_aux = []
        if checkpointing and len(self._block_aux_modules) != len(enc.blocks):
            self.refresh_aux_modules()
        for i, blk in enumerate(enc.blocks):
            if checkpointing:
                with set_checkpoint_early_stop(False):  # recompute whole blocks: see the docstring
                    x, aux = checkpoint(self._run_block, blk, self._block_aux_modules[i], self._aux_names, x,
                                        use_reentrant=False)
                self._pending_aux.append(aux)
            else:
                x = blk(x)
        return neck(enc, x)

    def collect_aux_losses(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum per name and clear the auxiliary losses the encoder's modules stored during the last forward."""
        totals = {name: like.new_zeros((), dtype=torch.float32) for name in self._aux_names}
        for aux in self._pending_aux:
            for i, name in enumerate(self._aux_names):
                totals[name] = totals[name] + aux[i]
        self._pending_aux = []
        for m in self._aux_modules:
            if m.aux_loss is not None:
                totals[m.aux_name] = totals[m.aux_name] + m.aux_loss.float()
                m.aux_loss = None
        return totals

    def forward(self, images: torch.Tensor) -> SegOutput:
        emb = self.encode(images)
        h, w = emb.shape[-2:]
        pe = self.prompt_encoder.pe_layer((h, w)).unsqueeze(0).to(emb.dtype)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(emb.dtype)
        masks, class_logits = self.decoder(emb, pe, dense)
        return SegOutput(masks, class_logits, self.collect_aux_losses(masks), emb)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, Q, h, w) logits to ``size``."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def logits_to_original(logits: torch.Tensor, input_size: int, valid_hw: tuple[int, int],
                       orig_hw: tuple[int, int]) -> torch.Tensor:
    """One image's (Q, h, w) logits -> (Q, H, W) at its original size: upsample, crop padding, resize."""
    x = upsample_logits(logits.unsqueeze(0), (input_size, input_size))
    x = x[..., : valid_hw[0], : valid_hw[1]]
    return upsample_logits(x, tuple(orig_hw))[0]


def image_scores(task: Any, out: SegOutput, j: int, img_size: int, valid_hw: list[int], size: list[int]) -> torch.Tensor:
    """Image ``j`` of a batch's outputs -> the task's per-pixel scores at ``size`` (padding cropped)."""
    logits = logits_to_original(out.masks[j], img_size, valid_hw, size)
    return task.scores(logits, None if out.class_logits is None else out.class_logits[j])
