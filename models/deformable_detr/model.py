"""Deformable DETR (Zhu et al., ICLR 2021): DETR with multi-scale deformable attention, optional iterative box
refinement and two-stage proposals.

Published quirks reproduced here: the heads are shared (plain) or cloned (refinement) and additionally registered
inside the decoder, so they appear under several state-dict keys; the class head has no "no object" logit.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from util.misc import NestedTensor

from ..backbone import Joiner
from ..box_refinement import refine_boxes
from ..heads import aux_outputs, build_detection_heads
from ..multiscale import MultiScaleDetector, build_input_proj, project_levels
from .transformer import DeformableTransformer

__all__ = ["DeformableDETR"]


class DeformableDETR(MultiScaleDetector):
    """Backbone levels -> deformable encoder-decoder -> per-layer class and box heads.

    Args:
        backbone: ``Joiner`` whose Backbone returns the feature levels (``stage_channels``).
        transformer: ``DeformableTransformer``.
        num_classes: K sigmoid class logits (91 for COCO; no "no object" class).
        num_queries: Q.
        num_feature_levels: L (backbone levels plus extra stride-2 levels).
        aux_loss: also return every earlier decoder layer's predictions.
        with_box_refine: each decoder layer refines the previous layer's boxes with its own head.
        two_stage: queries from encoder proposals (needs ``with_box_refine``, as published).
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False):  # fmt: skip
        super().__init__(transformer, num_queries, num_feature_levels, aux_loss)
        hidden_dim = self.hidden_dim
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        class_embed, bbox_embed = build_detection_heads(hidden_dim, num_classes)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = build_input_proj(backbone[0].stage_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            # Independent copies per layer; only the first starts with w, h = sigmoid(-2).
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            transformer.decoder.bbox_embed = self.bbox_embed  # published: the same modules, keys listed twice
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # One head shared by every layer, listed under each index (published key layout).
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def forward(self, samples: NestedTensor | list[Tensor] | Tensor) -> dict:
        """Detect objects.

        Args:
            samples: NestedTensor ([B, 3, H, W], mask [B, H, W] True on padding), a list of [3, H_i, W_i] images
                or a [B, 3, H, W] tensor.

        Returns:
            'pred_logits' [B, Q, K] (sigmoid logits), 'pred_boxes' [B, Q, 4] (cx, cy, w, h in [0, 1] of the
            unpadded image); with aux_loss 'aux_outputs' (earlier layers, first first); with two_stage
            'enc_outputs' {'pred_logits' [B, S, K], 'pred_boxes' [B, S, 4]} over all S encoder tokens.
        """
        srcs, masks, pos = project_levels(self.backbone, self.input_proj, samples)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed
        )
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            # Layer l predicts relative to the reference it used: the initial one, then layer l-1's refinement.
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(refine_boxes(self.bbox_embed[lvl](hs[lvl]), reference))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = aux_outputs(logits, boxes)
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out
