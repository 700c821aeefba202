"""DINO (Zhang et al., ICLR 2023): Deformable DETR plus contrastive denoising (models/denoising.py), mixed query
selection and look-forward-twice box refinement.

Everything else is Deformable DETR's (backbone levels, input projections, deformable encoder, decoder layer,
encoder proposals, heads). Published layout: ONE class head and ONE box head are shared by every decoder layer and
registered under four names each (``class_embed.i``, ``transformer.decoder.class_embed.i``, ``bbox_embed.i``,
``transformer.decoder.bbox_embed.i``); the encoder's heads are separate copies.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from util.misc import NestedTensor

from ..box_refinement import DINO_EPS, refine_boxes
from ..deformable_detr.transformer import (
    DeformableTransformerDecoderLayer,
    MultiScaleInput,
    MultiScaleTransformer,
    box_sine_embedding,
    flatten_levels,
    reset_deformable_parameters,
    scale_by_valid_ratios,
    score_encoder_tokens,
)
from ..denoising import dn_post_process, prepare_for_cdn
from ..heads import MLP, aux_outputs, build_detection_heads
from ..multiscale import MultiScaleDetector, build_input_proj, project_levels, select_top_queries

__all__ = ["DINO", "DINODecoder", "DINOTransformer"]


class DINODecoder(nn.Module):
    """Decoder whose query positions come from each layer's reference box, with look-forward-twice refinement.

    ``bbox_embed`` / ``class_embed`` are attached by DINO (the shared heads).
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: MultiScaleInput,
                self_attn_bias: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
        """Decode.

        Args:
            tgt: [B, N, D] content queries (dn queries first); reference: [B, N, 4] sigmoid boxes, no gradient.
            memory: [B, S, D]; self_attn_bias: [B, N, N] float (-inf = blocked) or None.

        Returns:
            (normalised outputs, L of [B, N, D]; references, L + 1 of [B, N, 4]: the initial one, then each
            layer's refined box WITH its gradient, so layer l + 1's loss reaches layer l's box: look forward twice).
        """
        outputs, references = [], [reference]
        output = tgt
        half = memory.shape[-1] // 2
        for lid, layer in enumerate(self.layers):
            reference_input = scale_by_valid_ratios(reference, levels.valid_ratios)
            # Sine embedding of the level-0 box in (y, x, w, h) order (published gen_sineembed_for_position).
            box = reference_input[:, :, 0]
            sine = box_sine_embedding(box[..., [1, 0, 2, 3]], num_feats=half)
            query_pos = self.ref_point_head(sine.to(output.dtype))
            output = layer(output, query_pos, reference_input, memory, levels, self_attn_bias)
            # Refinement reads the UN-normalised output; the predictions below read the normalised one.
            refined = refine_boxes(self.bbox_embed[lid](output), reference, DINO_EPS)
            reference = refined.detach()
            references.append(refined)
            outputs.append(self.norm(output))
        return outputs, references


class DINOTransformer(MultiScaleTransformer):
    """Deformable encoder, mixed query selection (positions from the top-Q proposals, content learned), DINO decoder.

    Args: as DeformableTransformer; ``num_queries`` = Q selected proposals (900 published).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 num_queries: int = 900, attention: str = "sdpa"):  # fmt: skip
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         num_feature_levels, dec_n_points, enc_n_points, attention)  # fmt: skip
        self.num_queries = num_queries
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        nn.init.normal_(self.tgt_embed.weight)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        # Published order: xavier on every matrix (overwriting tgt_embed's normal init), then the attention init.
        reset_deformable_parameters(self)
        # Attached by DINO after this init (deep copies of the initialised shared heads).
        self.enc_out_class_embed: nn.Linear | None = None
        self.enc_out_bbox_embed: MLP | None = None

    def build_decoder(self, layer: DeformableTransformerDecoderLayer, num_layers: int) -> nn.Module:
        return DINODecoder(layer, num_layers, self.d_model)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                dn_boxes_unact: Tensor | None = None, dn_content: Tensor | None = None,
                self_attn_bias: Tensor | None = None):  # fmt: skip
        """Encode, select the queries and decode.

        Args:
            srcs, masks, pos_embeds: per level, as DeformableTransformer.
            dn_boxes_unact: [B, pad, 4] unsigmoided denoising boxes; dn_content: [B, pad, D] (or both None).
            self_attn_bias: [B, pad + Q, pad + Q] float mask (-inf = blocked) or None.

        Returns:
            (hs: L of [B, pad + Q, D], references: L + 1 of [B, pad + Q, 4], interm: {'pred_logits' [B, Q, K],
            'pred_boxes' [B, Q, 4]} of the selected encoder tokens, interm_pre: the same logits with the sigmoid of
            the raw proposals). With fewer encoder tokens S than ``num_queries`` (small images): Q = S, the first S
            content queries.
        """
        levels = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(levels)
        batch = memory.shape[0]
        output_memory, proposals, enc_class, enc_coord_unact = score_encoder_tokens(
            memory, levels, self.enc_output, self.enc_output_norm, self.enc_out_class_embed, self.enc_out_bbox_embed
        )
        # Mixed query selection: the top-Q tokens by their best class logit give the positions (all S if S < Q).
        coord_unact, selected_memory, selected_proposals = select_top_queries(
            enc_class.max(-1)[0], self.num_queries, enc_coord_unact, output_memory, proposals
        )
        num_selected = coord_unact.shape[1]
        interm_logits = self.enc_out_class_embed(selected_memory)
        interm = {"pred_logits": interm_logits, "pred_boxes": coord_unact.sigmoid()}
        interm_pre = {"pred_logits": interm_logits, "pred_boxes": selected_proposals.sigmoid()}
        reference_unact = coord_unact.detach()
        content = self.tgt_embed.weight[:num_selected].unsqueeze(0)  # content: learned, not the encoder's
        if torch.compiler.is_exporting():
            # A stride-0 (expanded) batch makes F.linear's reshape, or .contiguous(), guard on batch == 1, which
            # torch.export then bakes into the graph; repeat copies without that test (same values).
            tgt = content.repeat(batch, 1, 1)
        else:
            tgt = content.expand(batch, -1, -1)
        if self_attn_bias is not None and num_selected < self.num_queries:  # drop the unselected queries' rows
            size = self_attn_bias.shape[-1] - (self.num_queries - num_selected)
            self_attn_bias = self_attn_bias[:, :size, :size]
        if dn_boxes_unact is not None:
            reference_unact = torch.cat([dn_boxes_unact.to(reference_unact.dtype), reference_unact], 1)
            tgt = torch.cat([dn_content.to(tgt.dtype), tgt], 1)
        hs, references = self.decoder(tgt, reference_unact.sigmoid(), memory, levels, self_attn_bias)
        return hs, references, interm, interm_pre


class DINO(MultiScaleDetector):
    """DINO detector.

    Args:
        backbone: ``Joiner`` returning the ``return_interm_indices`` stages.
        transformer: ``DINOTransformer``.
        num_classes: K sigmoid logits.
        num_queries: Q matching queries.
        num_feature_levels: L.
        aux_loss: return every earlier decoder layer.
        dn_number, dn_label_noise_ratio, dn_box_noise_scale: contrastive denoising (training with targets only).
        dn_labelbook_size: rows of ``label_enc`` minus one.
    """

    def __init__(self, backbone, transformer: DINOTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, dn_number: int = 100,
                 dn_label_noise_ratio: float = 0.5, dn_box_noise_scale: float = 0.4,
                 dn_labelbook_size: int = 91):  # fmt: skip
        super().__init__(transformer, num_queries, num_feature_levels, aux_loss)
        hidden_dim = self.hidden_dim
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)
        self.input_proj = build_input_proj(backbone[0].stage_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone
        class_embed, bbox_embed = build_detection_heads(hidden_dim, num_classes)
        layers = transformer.decoder.num_layers
        self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(layers))
        self.class_embed = nn.ModuleList(class_embed for _ in range(layers))
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        transformer.enc_out_class_embed = copy.deepcopy(class_embed)

    # The training loop passes the targets to models with this flag (denoising queries are built from them).
    needs_targets = True

    def forward(self, samples: NestedTensor | list[Tensor] | Tensor, targets: list[dict] | None = None) -> dict:
        """Detect objects; in training mode with ``targets``, also decode the denoising queries.

        Returns:
            'pred_logits' [B, Q, K], 'pred_boxes' [B, Q, 4] (sigmoid cx, cy, w, h) of the last layer,
            'aux_outputs' (earlier layers), 'interm_outputs' / 'interm_outputs_for_matching_pre' (selected encoder
            tokens) and 'dn_meta' (None in evaluation, else pad_size, num_dn_group and 'output_known_lbs_bboxes').
        """
        srcs, masks, pos = project_levels(self.backbone, self.input_proj, samples)
        dn_content, dn_boxes, attn_mask, dn_meta = prepare_for_cdn(
            targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale, self.num_queries,
            self.num_classes, self.hidden_dim, self.label_enc, training=self.training and targets is not None,
        )  # fmt: skip
        bias = None
        if attn_mask is not None:
            blocked = torch.zeros(attn_mask.shape, dtype=srcs[0].dtype, device=attn_mask.device)
            bias = blocked.masked_fill(attn_mask, float("-inf"))[None].expand(srcs[0].shape[0], -1, -1)
        hs, references, interm, interm_pre = self.transformer(srcs, masks, pos, dn_boxes, dn_content, bias)
        # Published: keeps label_enc in the graph (a zero gradient) when no denoising query used it.
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        boxes = torch.stack(
            [refine_boxes(head(h), ref, DINO_EPS) for head, h, ref in zip(self.bbox_embed, hs, references[:-1])]
        )
        logits, boxes = dn_post_process(logits, boxes, dn_meta, self.aux_loss, aux_outputs)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = aux_outputs(logits, boxes)
        out["interm_outputs"] = interm
        out["interm_outputs_for_matching_pre"] = interm_pre
        out["dn_meta"] = dn_meta
        return out
