"""SemanticSAM2: SAM 2.1 as an end-to-end semantic-segmentation model, :class:`SemanticSAM`'s SAM 2 twin.

    image (B, 3, H, W), normalised, H and W multiples of 32
      -> Hiera trunk (frozen, PEFT-adapted)            -> four stage outputs (strides 4, 8, 16, 32)
      -> FPN neck (frozen), stride-32 level dropped     -> s4, s8, s16 (B, C, ., .)
      -> s16 + no_mem_embed                             -> embeddings (B, C, H/16, W/16), as SAM 2 does for
                                                           an image with no memory (directly_add_no_mem_embed)
      -> constant prompt: SAM2Base's "no prompt" (one padding point, label -1, plus the padding point the
         prompt encoder adds: two not-a-point tokens) and the no-mask embedding
      -> SAM 2's mask decoder, batched over images, with s4 and s8 through its conv_s0 / conv_s1 as the
         high-resolution features                       -> mask logits (B, Q, H/4, W/4)
                                                           (+ class logits (B, Q, K+1) when multi-class)

As for SAM 1, the decoder keeps SAM 2's object-score and IoU tokens as input tokens but drops their
heads and the three multimask tokens; every mask token starts as mask token 0. SAM 2's object-score
gate (masks set to -1024 where the object score is negative) is not applied: the semantic mask is
itself the answer to "is there an object". Multi-class (class head, set loss, text head) is SemanticSAM's.
"""

from __future__ import annotations

from typing import Optional

import torch

from samft.model.hiera_encoder import HieraEncoder
from samft.model.semantic import SemanticMaskDecoder, SemanticSAM


class SemanticMaskDecoder2(SemanticMaskDecoder):
    """SAM 2's mask decoder decoding a batch with ``num_queries`` mask tokens and high-resolution maps."""

    def __init__(self, decoder, num_queries: int = 1, num_classes: int = 1) -> None:
        super().__init__(decoder, num_queries, num_classes)
        self.obj_score_token = decoder.obj_score_token
        self.conv_s0 = decoder.conv_s0
        self.conv_s1 = decoder.conv_s1

    def leading_tokens(self) -> list[torch.Tensor]:
        """SAM 2's object-score and IoU tokens."""
        return [self.obj_score_token.weight, self.iou_token.weight]

    def upscale(self, src: torch.Tensor, high_res: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """SAM 2's upscaling: the stride-8 map (conv_s1) added after the first transposed conv, the stride-4
        map (conv_s0) after the second."""
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = self.conv_s0(high_res[0]), self.conv_s1(high_res[1])
        x = act1(ln1(dc1(src) + feat_s1))
        return act2(dc2(x) + feat_s0)


class SemanticSAM2(SemanticSAM):
    """SAM 2.1 (:class:`~samft.model.hiera.Sam2Parts`) as a semantic-segmentation model."""

    def __init__(self, parts, num_queries: int = 1, num_classes: int = 1, img_size: int = 1024) -> None:
        torch.nn.Module.__init__(self)
        self.image_encoder = HieraEncoder(parts.image_encoder, img_size)
        self.prompt_encoder = parts.sam_prompt_encoder
        self.no_mem_embed = parts.no_mem_embed
        self.decoder = SemanticMaskDecoder2(parts.sam_mask_decoder, num_queries, num_classes)
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.taps = frozenset(self.image_encoder.stage_ends)

    family = "sam2"

    @property
    def feature_channels(self) -> int:
        """Channels of the stride-16 embeddings the decoder reads: the FPN neck's width (``d_model``)."""
        return self.image_encoder.neck.d_model

    def freeze_base(self) -> None:
        super().freeze_base()
        self.no_mem_embed.requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.embed(images)

    def levels(self, x: torch.Tensor, tapped: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[list]]:
        s4, s8, s16 = self.image_encoder.levels(tapped)
        emb = s16 + self.no_mem_embed.reshape(1, -1, 1, 1).to(s16.dtype)
        return emb, [s4, s8]

    def prompt(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """SAM2Base's prompt with no points, boxes or mask: a padding point (label -1) and the prompt
        encoder's own padding point, i.e. two not-a-point tokens; the no-mask dense embedding."""
        pe, dense, _ = super().prompt(emb)
        points = torch.zeros(1, 1, 2, device=emb.device)
        labels = -torch.ones(1, 1, dtype=torch.int32, device=emb.device)
        sparse = self.prompt_encoder._embed_points(points, labels, pad=True).to(emb.dtype)
        return pe, dense, sparse
