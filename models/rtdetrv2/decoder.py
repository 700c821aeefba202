"""RT-DETRv2's decoder (Lv et al. 2024; RT-DETR, Zhao et al. 2024, section 4.3): query selection + refinement.

The decoder owns everything after the encoder: it flattens the three fused levels into a memory, scores every
token with an encoder head, takes the top-K tokens as queries (content = the token's features, reference = its
anchor refined by a box head; both detached), prepends DINO-style denoising queries in training, and runs
post-norm layers of self-attention, deformable cross-attention and a feed-forward net, refining the boxes layer by
layer in logit space. Layer i's training box uses the previous refined box WITH gradient ("look forward twice",
DINO section 3.5) while layer i + 1 starts from the detached one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.box_refinement import DEFORMABLE_EPS, inverse_sigmoid
from models.denoising import prepare_for_rtdetr_cdn
from models.detr import MLP
from models.ms_deform_attn import MSDeformAttn, ms_deform_attn_core

__all__ = ["MSDeformableAttention", "RTDETRTransformerv2", "generate_anchors"]


def generate_anchors(
    spatial_shapes: Sequence[tuple[int, int]], grid_size: float = 0.05, eps: float = 0.01, device=None
) -> tuple[Tensor, Tensor]:
    """Anchor boxes of every token, in logit space, and their validity.

    Level l (h, w): centres ((x + 0.5) / w, (y + 0.5) / h) row-major, size grid_size * 2^l; an anchor is valid if
    all four numbers are in (eps, 1 - eps).

    Returns:
        anchors [1, S, 4] float32 log(a / (1 - a)), +inf where invalid; valid_mask [1, S, 1] bool.
    """
    levels = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        centre = (torch.stack([grid_x, grid_y], -1) + 0.5) / torch.tensor([w, h], dtype=torch.float32, device=device)
        size = torch.full_like(centre, grid_size * 2.0**lvl)
        levels.append(torch.cat([centre, size], -1).reshape(1, h * w, 4))
    anchors = torch.cat(levels, 1)
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    return torch.where(valid, anchors, torch.full_like(anchors, math.inf)), valid


class MSDeformableAttention(MSDeformAttn):
    """RT-DETRv2's deformable cross-attention: the shared module with box references and ``num_points_scale``.

    Same parameters and init as :class:`MSDeformAttn` (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``; offsets level-major, L * P per head), plus the saved buffer
    ``num_points_scale`` [L * P] = 1 / P. Location = ref_xy + offset * (1 / P) * ref_wh * 0.5.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, n_levels: int = 3, n_points: int = 4):
        super().__init__(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.register_buffer("num_points_scale", torch.full((n_levels * n_points,), 1.0 / n_points))

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, spatial_shapes: Sequence[tuple[int, int]]):
        """query [B, Q, C], reference [B, Q, 4] sigmoid cxcywh, value [B, S, C] (levels row-major) -> [B, Q, C]."""
        b, q, _ = query.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value).view(b, value.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, q, m, n_levels * n_points, 2).float()
        weights = self.attention_weights(query).view(b, q, m, n_levels * n_points).float().softmax(-1)
        ref = reference.float()[:, :, None, None, :]
        scale = self.num_points_scale.float()[:, None]
        locations = ref[..., :2] + offsets * scale * ref[..., 2:] * 0.5
        locations = locations.view(b, q, m, n_levels, n_points, 2)
        out = ms_deform_attn_core(
            value, spatial_shapes, locations, weights.view(b, q, m, n_levels, n_points), kernel=self.kernel
        )
        return self.output_proj(out)


class DecoderLayer(nn.Module):
    """Post-norm: self-attention (dn mask) -> norm1, deformable cross-attention -> norm2, ReLU FFN -> norm3."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, n_levels: int, n_points: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, nhead, n_levels, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        tgt: Tensor,
        ref: Tensor,
        memory: Tensor,
        shapes: Sequence[tuple[int, int]],
        pos: Tensor,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """tgt [B, T, C], ref [B, T, 4], memory [B, S, C], pos [B, T, C], attn_mask [T, T] bool -> [B, T, C]."""
        q = k = tgt + pos
        tgt = self.norm1(
            tgt + self.dropout1(self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)[0])
        )
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + pos, ref, memory, shapes)))
        # In place: linear1's output feeds only the ReLU, and the ReLU's backward reads its own output.
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(ffn))


class _Layers(nn.Module):
    """Holder of the decoder layers (keys ``layers.{i}``, no final norm)."""

    def __init__(self, layers: Sequence[DecoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class RTDETRTransformerv2(nn.Module):
    """Query selection, denoising and the refining decoder (module names as published).

    Args:
        num_classes: K.
        hidden_dim: decoder width (256 in every recipe).
        num_queries: K queries selected from the encoder tokens.
        feat_channels: encoder width per level (enc_hidden_dim x 3).
        num_layers: L decoder layers.
        nhead, dim_feedforward, dropout: of each layer.
        n_points: sampling points per head and level.
        num_denoising, label_noise_ratio, box_noise_scale: denoising (0 queries disables it).
        eval_idx: the layer whose output is returned in eval (-1 = last); training always runs all L.
        eval_spatial_size: (H, W) of eval inputs: its anchors and valid mask are the saved buffers ``anchors``
            [1, S, 4] and ``valid_mask`` [1, S, 1]. None: computed per input.
        aux_loss: return the per-layer, encoder and denoising outputs in training.
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: Sequence[int] = (256, 256, 256),
        num_layers: int = 6,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        n_points: int = 4,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_idx: int = -1,
        eval_spatial_size: tuple[int, int] | None = (640, 640),
        aux_loss: bool = True,
    ):
        super().__init__()
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"RTDETRTransformerv2: eval_idx {eval_idx} out of range for {num_layers} layers")
        self.num_classes, self.hidden_dim, self.num_queries = num_classes, hidden_dim, num_queries
        self.num_layers, self.num_levels = num_layers, len(feat_channels)
        self.eval_idx = eval_idx % num_layers
        self.num_denoising, self.label_noise_ratio, self.box_noise_scale = (
            num_denoising,
            label_noise_ratio,
            box_noise_scale,
        )
        self.aux_loss = aux_loss
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict([("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)), ("norm", nn.BatchNorm2d(hidden_dim))])
            )
            for c in feat_channels
        )
        layers = [
            DecoderLayer(hidden_dim, nhead, dim_feedforward, self.num_levels, n_points, dropout)
            for _ in range(num_layers)
        ]
        self.decoder = _Layers(layers)
        # As published, only with denoising: a num_denoising 0 checkpoint has no such key.
        self.denoising_class_embed = (
            nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes) if num_denoising > 0 else None
        )
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential(
            OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))])
        )
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))
        self.eval_spatial_size = tuple(eval_spatial_size) if eval_spatial_size is not None else None
        if self.eval_spatial_size is not None:
            anchors, valid = generate_anchors(self._level_shapes(*self.eval_spatial_size))
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid)
        self._reset_parameters()

    def _level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(height // s, width // s) for s in (8, 16, 32)[: self.num_levels]]

    def _reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)  # score bias: initial foreground probability 0.01
        for score_head, bbox_head in zip(
            [self.enc_score_head, *self.dec_score_head], [self.enc_bbox_head, *self.dec_bbox_head]
        ):
            nn.init.constant_(score_head.bias, prior)
            nn.init.zeros_(bbox_head.layers[-1].weight)
            nn.init.zeros_(bbox_head.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)

    def _anchors(self, shapes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        size = sum(h * w for h, w in shapes)
        if not self.training and self.eval_spatial_size is not None and self.anchors.shape[1] == size:
            return self.anchors, self.valid_mask
        # Training (multi-scale) computes them for the input, as published; other eval sizes likewise.
        return generate_anchors(shapes, device=device)

    def _select_queries(self, memory: Tensor, shapes: list[tuple[int, int]]):
        """Encoder score head on every token, the top-K tokens by their best class logit (descending), and the
        encoder box head on those K only.

        The published code runs the box head on all S tokens and gathers K of them; a per-token MLP commutes
        with the gather (same values, and the gradient only ever reached the gathered rows), at K / S of the
        cost (300 of 8400 tokens at 640 x 640).

        Returns: content [B, K, C] (detached), reference logits [B, K, 4] (detached), and the gathered encoder
        logits [B, K, num_classes] and boxes [B, K, 4] (with gradient, for the encoder loss).
        """
        anchors, valid = self._anchors(shapes, memory.device)
        memory = valid.to(memory.dtype) * memory
        out_memory = self.enc_output(memory)
        logits = self.enc_score_head(out_memory)
        if memory.shape[1] < self.num_queries:
            raise ValueError(
                f"RT-DETRv2: the input gives {memory.shape[1]} encoder tokens, fewer than num_queries "
                f"{self.num_queries}; use larger images or fewer queries"
            )
        index = logits.max(-1).values.topk(self.num_queries, dim=1).indices  # [B, K]

        def gather(x: Tensor) -> Tensor:
            x = x.expand(index.shape[0], -1, -1)
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

        topk_logits, topk_memory = gather(logits), gather(out_memory)
        topk_coords = self.enc_bbox_head(topk_memory) + gather(anchors)
        return topk_memory.detach(), topk_coords.detach(), topk_logits, topk_coords.sigmoid()

    def forward(self, feats: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None) -> dict:
        """Detect from the encoder's three maps.

        Args:
            feats: three [B, C_l, H_l, W_l] maps (strides 8/16/32).
            targets: per image {'labels' [T] int64 in [0, K), 'boxes' [T, 4] normalised cxcywh}; in training they
                add the denoising queries.

        Returns:
            'pred_logits' [B, K, num_classes], 'pred_boxes' [B, K, 4] sigmoid cxcywh (eval: layer eval_idx;
            training: the last layer), and in training with aux_loss 'aux_outputs' (layers 0..L-2),
            'enc_aux_outputs' (1), 'enc_meta', plus 'dn_aux_outputs' (L) and 'dn_meta' with denoising.
        """
        shapes = [(int(f.shape[2]), int(f.shape[3])) for f in feats]
        memory = torch.cat([proj(f).flatten(2).transpose(1, 2) for proj, f in zip(self.input_proj, feats)], 1)
        dn_content = dn_ref = attn_mask = dn_meta = None
        if self.training and self.num_denoising > 0 and targets is not None:
            dn_content, dn_ref, attn_mask, dn_meta = prepare_for_rtdetr_cdn(
                targets,
                self.num_classes,
                self.num_queries,
                self.denoising_class_embed,
                self.num_denoising,
                self.label_noise_ratio,
                self.box_noise_scale,
            )
        content, ref_logits, enc_logits, enc_boxes = self._select_queries(memory, shapes)
        if dn_content is not None:
            content = torch.cat([dn_content.to(content.dtype), content], 1)
            ref_logits = torch.cat([dn_ref.to(ref_logits.dtype), ref_logits], 1)

        logits, boxes = self._decode(content, ref_logits, memory, shapes, attn_mask)
        if dn_meta is not None:
            dn_logits, logits = logits.split(dn_meta["dn_num_split"], dim=2)
            dn_boxes, boxes = boxes.split(dn_meta["dn_num_split"], dim=2)
        out: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = _as_outputs(logits[:-1], boxes[:-1])
            out["enc_aux_outputs"] = [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}]
            out["enc_meta"] = {"class_agnostic": False}
            if dn_meta is not None:
                out["dn_aux_outputs"] = _as_outputs(dn_logits, dn_boxes)
                out["dn_meta"] = dn_meta
        return out

    def _decode(
        self, tgt: Tensor, ref_logits: Tensor, memory: Tensor, shapes: list[tuple[int, int]], attn_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Run the layers; returns stacked logits [L', B, T, num_classes] and boxes [L', B, T, 4].

        L' = L in training, 1 (layer eval_idx) in eval, where the loop stops after that layer.
        """
        ref_detached = ref_logits.sigmoid()
        ref = ref_detached
        all_logits, all_boxes = [], []
        for i, layer in enumerate(self.decoder.layers):
            tgt = layer(tgt, ref_detached, memory, shapes, self.query_pos_head(ref_detached), attn_mask)
            delta = self.dec_bbox_head[i](tgt)
            refined = (delta + inverse_sigmoid(ref_detached, DEFORMABLE_EPS)).sigmoid()
            if self.training:
                all_logits.append(self.dec_score_head[i](tgt))
                # Look forward twice: the box of layer i > 0 refines layer i-1's box WITH its gradient (same value).
                all_boxes.append(refined if i == 0 else (delta + inverse_sigmoid(ref, DEFORMABLE_EPS)).sigmoid())
            elif i == self.eval_idx:
                all_logits.append(self.dec_score_head[i](tgt))
                all_boxes.append(refined)
                break
            ref = refined
            ref_detached = refined.detach()
        return torch.stack(all_logits), torch.stack(all_boxes)


def _as_outputs(logits: Tensor, boxes: Tensor) -> list[dict[str, Tensor]]:
    """[N, B, T, K], [N, B, T, 4] -> N output dicts."""
    return [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits, boxes)]
