"""Deformable DETR's multi-scale encoder-decoder (Zhu et al., ICLR 2021, sections 4.1-4.2), batch-first.

Parameter names are the published ones (``encoder.layers.i.self_attn.sampling_offsets``, ``level_embed``,
``reference_points``, ``enc_output``, ``pos_trans`` ...), so published checkpoints load unchanged. The parts DINO
shares (encoder, decoder layer, valid ratios, encoder proposals, the box sine embedding) are public here.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import MultiheadAttention
from ..box_refinement import refine_boxes
from ..ms_deform_attn import MSDeformAttn, _shapes_as_tensor, level_sizes
from ..multiscale import select_top_queries

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "MultiScaleInput",
    "box_sine_embedding",
    "build_encoder_and_decoder_layer",
    "encoder_proposals",
    "flatten_levels",
    "reset_deformable_parameters",
    "scale_by_valid_ratios",
    "score_encoder_tokens",
    "valid_ratios",
]


class MultiScaleInput:
    """The feature levels flattened for deformable attention.

    Attributes:
        src: [B, S, D] all levels' tokens, row-major per level, level 0 (finest) first.
        pos: [B, S, D] position encoding plus level embedding.
        padding_mask: [B, S] bool, True on padding.
        spatial_shapes: int64 [L, 2] (H_l, W_l).
        level_start_index: int64 [L] offset of each level in S.
        valid_ratios: [B, L, 2] (valid W / W, valid H / H) per image and level.
    """

    def __init__(self, src, pos, padding_mask, spatial_shapes, level_start_index, valid_ratios):
        self.src = src
        self.pos = pos
        self.padding_mask = padding_mask
        self.spatial_shapes = spatial_shapes
        self.level_start_index = level_start_index
        self.valid_ratios = valid_ratios


def valid_ratios(mask: Tensor) -> Tensor:
    """[B, H, W] padding mask -> [B, 2] (valid W / W, valid H / H), counted along the first row and column."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


def flatten_levels(srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], level_embed: Tensor):
    """Per-level [B, D, H_l, W_l] features, [B, H_l, W_l] masks and positions -> ``MultiScaleInput``."""
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pos = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1)
    padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
    if torch.compiler.is_exporting():  # torch.export: the symbolic (H, W) themselves (level_sizes passes them on)
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
        shapes = _shapes_as_tensor(spatial_shapes, src.device)
    else:  # _shape_as_tensor: traced sizes, so an ONNX graph accepts other image sizes (torchvision does the same)
        spatial_shapes = shapes = torch.stack([torch._shape_as_tensor(s)[-2:] for s in srcs]).to(device=src.device)
    level_start_index = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    ratios = torch.stack([valid_ratios(m) for m in masks], 1)
    return MultiScaleInput(src, pos.to(src.dtype), padding_mask, spatial_shapes, level_start_index, ratios)


def box_sine_embedding(coords: Tensor, num_feats: int = 128, temperature: float = 10000) -> Tensor:
    """Sine embedding of normalised coordinates [..., n] in [0, 1] -> [..., n * num_feats].

    Each coordinate c becomes sin/cos (interleaved) of 2*pi*c / T^(2*floor(i/2)/num_feats), coordinates
    concatenated in the given order (Deformable DETR's two-stage queries use cx, cy, w, h; DINO's decoder y, x, w, h).
    """
    index = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    angles = coords.float()[..., None] * (2 * math.pi) / dim_t
    embedded = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return embedded.flatten(-2)


def encoder_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Two-stage proposals: one box per encoder token (its cell centre, size 0.05 * 2^level).

    Args:
        memory: [B, S, D] encoder output.
        padding_mask: [B, S] bool, True on padding.
        spatial_shapes: int64 [L, 2].

    Returns:
        (memory [B, S, D] zeroed at padded tokens and invalid proposals, proposals [B, S, 4] in logit space,
        +inf where padded or invalid: any coordinate outside (0.01, 0.99)).
    """
    batch = memory.shape[0]
    proposals, start = [], 0
    for lvl, (height, width) in enumerate(level_sizes(spatial_shapes)):
        level_mask = padding_mask[:, start : start + height * width].view(batch, height, width)
        valid_h = (~level_mask[:, :, 0]).sum(1)
        valid_w = (~level_mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=memory.device),
            torch.arange(width, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)  # [H, W, 2] as (x, y)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        centres = (grid[None] + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * 2.0**lvl)
        proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
        start = start + height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    return memory.masked_fill(invalid, 0.0), proposals


def score_encoder_tokens(
    memory: Tensor, levels: MultiScaleInput, enc_output: nn.Linear, enc_output_norm: nn.LayerNorm,
    class_head: nn.Module, box_head: nn.Module,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Every encoder token as a proposal, scored by the proposal heads (two-stage; DINO's query selection).

    Returns:
        (output memory [B, S, D] after ``enc_output`` and its norm, proposals [B, S, 4] in logit space (+inf where
        invalid), class logits [B, S, K], box logits [B, S, 4] = box head + proposal).
    """
    output_memory, proposals = encoder_proposals(memory, levels.padding_mask, levels.spatial_shapes)
    output_memory = enc_output_norm(enc_output(output_memory))
    return output_memory, proposals, class_head(output_memory), box_head(output_memory) + proposals


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + ReLU feed-forward, post-norm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):  # fmt: skip
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, levels: MultiScaleInput) -> Tensor:
        """[B, S, D] tokens, [B, S, D] positions, [B, S, L, 2] references -> [B, S, D]."""
        attended = self.self_attn(
            src + pos, reference_points, src, levels.spatial_shapes, levels.level_start_index, levels.padding_mask
        )
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class DeformableTransformerEncoder(nn.Module):
    """``num_layers`` copies of the encoder layer (no final norm)."""

    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, ratios: Tensor, device: torch.device) -> Tensor:
        """Each token's cell centre, normalised by its level's valid size, seen from every level -> [B, S, L, 2]."""
        points = []
        for lvl, (height, width) in enumerate(level_sizes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(  # cell centres i + 0.5 (linspace(0.5, H - 0.5, H), traceable)
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * ratios[:, None]

    def forward(self, levels: MultiScaleInput) -> Tensor:
        """Encode the flattened levels -> memory [B, S, D]."""
        reference_points = self.get_reference_points(levels.spatial_shapes, levels.valid_ratios, levels.src.device)
        output = levels.src
        for layer in self.layers:
            output = layer(output, levels.pos, reference_points.to(output.dtype), levels)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention to the memory, feed-forward; post-norm.

    Shared by DINO (same modules and order: sa -> ca -> ffn).
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, attention: str = "sdpa"):  # fmt: skip
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout, kernel=attention)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                levels: MultiScaleInput, self_attn_bias: Tensor | None = None) -> Tensor:  # fmt: skip
        """[B, Q, D] queries and positions, [B, Q, L, 2|4] references (valid-ratio scaled), memory [B, S, D].

        ``self_attn_bias`` [B, Q, Q] float (-inf = blocked): DINO's denoising mask.
        """
        q = tgt + query_pos
        attended = self.self_attn(q, q, tgt, attn_bias=self_attn_bias)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, levels.spatial_shapes, levels.level_start_index,
            levels.padding_mask,
        )  # fmt: skip
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))


def scale_by_valid_ratios(reference: Tensor, ratios: Tensor) -> Tensor:
    """[B, Q, 2|4] references -> [B, Q, L, 2|4] in each level's padded frame (boxes: w, h scaled too)."""
    if reference.shape[-1] == 4:
        ratios = torch.cat([ratios, ratios], -1)
    return reference[:, :, None] * ratios[:, None].to(reference.dtype)


class DeformableTransformerDecoder(nn.Module):
    """``num_layers`` decoder layers (no final norm); with ``bbox_embed`` set, iterative box refinement.

    ``bbox_embed`` / ``class_embed`` are the detector's per-layer heads, attached by DeformableDETR (published
    layout: they then also appear as ``transformer.decoder.bbox_embed.i`` keys).
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, levels: MultiScaleInput,
                query_pos: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Decode -> (outputs [L, B, Q, D], references [L, B, Q, 2|4]: the reference after each layer)."""
        outputs, references = [], []
        output = tgt
        for lid, layer in enumerate(self.layers):
            output = layer(output, query_pos, scale_by_valid_ratios(reference_points, levels.valid_ratios), memory,
                           levels)  # fmt: skip
            if self.bbox_embed is not None:
                # Published: the refined reference is detached before the next layer (no gradient through it).
                reference_points = refine_boxes(self.bbox_embed[lid](output), reference_points).detach()
            outputs.append(output)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


def build_encoder_and_decoder_layer(
    d_model: int, nhead: int, num_encoder_layers: int, dim_feedforward: int, dropout: float,
    num_feature_levels: int, dec_n_points: int, enc_n_points: int, attention: str = "sdpa",
) -> tuple[DeformableTransformerEncoder, DeformableTransformerDecoderLayer]:  # fmt: skip
    """The deformable encoder and the decoder layer to stack: shared by Deformable DETR and DINO."""
    if d_model % nhead:
        raise ValueError(f"--hidden_dim {d_model} must be divisible by --nheads {nhead}")
    encoder_layer = DeformableTransformerEncoderLayer(
        d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
    )
    decoder_layer = DeformableTransformerDecoderLayer(
        d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points, attention
    )
    return DeformableTransformerEncoder(encoder_layer, num_encoder_layers), decoder_layer


def reset_deformable_parameters(transformer: nn.Module) -> None:
    """Published init: xavier-uniform on every matrix, then each MSDeformAttn's own init, level_embed N(0, 1)."""
    for p in transformer.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for module in transformer.modules():
        if isinstance(module, MSDeformAttn):
            module._reset_parameters()
    nn.init.normal_(transformer.level_embed)


class MultiScaleTransformer(nn.Module):
    """What the deformable families' transformers share, registered in the published order: the deformable
    encoder, the decoder the subclass builds from the shared decoder layer (``build_decoder``), the level embedding.

    Args: as ``DeformableTransformer``.
    """

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int, dropout: float, num_feature_levels: int, dec_n_points: int,
                 enc_n_points: int, attention: str):  # fmt: skip
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(f"--dec_layers must be at least 1, got {num_decoder_layers}")
        self.d_model = d_model
        self.nhead = nhead
        self.encoder, decoder_layer = build_encoder_and_decoder_layer(
            d_model, nhead, num_encoder_layers, dim_feedforward, dropout, num_feature_levels, dec_n_points,
            enc_n_points, attention,
        )  # fmt: skip
        self.decoder = self.build_decoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))

    def build_decoder(self, layer: DeformableTransformerDecoderLayer, num_layers: int) -> nn.Module:
        """The family's decoder of ``num_layers`` copies of ``layer``."""
        raise NotImplementedError


class DeformableTransformer(MultiScaleTransformer):
    """Deformable DETR encoder-decoder with optional two-stage query selection.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: as in DETR.
        num_feature_levels: L.
        dec_n_points / enc_n_points: sampling points per head and level.
        two_stage: queries from the top-scoring encoder proposals (heads attached by DeformableDETR).
        two_stage_num_proposals: how many proposals become queries (= num_queries; all S encoder tokens when
            S is smaller, see ``models.multiscale.num_selected_queries``).
        attention: kernel of the decoder self-attention ('sdpa' or 'math').
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300,
                 attention: str = "sdpa"):  # fmt: skip
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         num_feature_levels, dec_n_points, enc_n_points, attention)  # fmt: skip
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def build_decoder(self, layer: DeformableTransformerDecoderLayer, num_layers: int) -> nn.Module:
        return DeformableTransformerDecoder(layer, num_layers)

    def _reset_parameters(self) -> None:
        reset_deformable_parameters(self)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None):  # fmt: skip
        """Encode the levels and decode the queries.

        Args:
            srcs: L projected feature maps [B, D, H_l, W_l]; masks: L [B, H_l, W_l] bool (True = padding);
            pos_embeds: L [B, D, H_l, W_l] position encodings.
            query_embed: [Q, 2D] (query_pos, tgt) without two-stage.

        Returns:
            (hs [L_dec, B, Q, D], init_reference [B, Q, 2|4], inter_references [L_dec, B, Q, 2|4],
            enc_outputs_class [B, S, K] or None, enc_outputs_coord_unact [B, S, 4] or None). Two-stage with fewer
            encoder tokens S than queries: Q = S.
        """
        levels = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(levels)
        batch, _, dim = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            proposal_head = self.decoder.num_layers  # heads 0..L-1 score the decoder layers, head L the proposals
            _, _, enc_class, enc_coord_unact = score_encoder_tokens(
                memory, levels, self.enc_output, self.enc_output_norm, self.decoder.class_embed[proposal_head],
                self.decoder.bbox_embed[proposal_head],
            )  # fmt: skip
            # Ranked by the first class logit; the selected boxes are detached, so the decoder loss does not reach
            # the proposal head (both published).
            topk_coords_unact = select_top_queries(enc_class[..., 0], self.two_stage_num_proposals, enc_coord_unact)[0]
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            embedding = box_sine_embedding(reference_points, num_feats=dim // 2)  # 128 for the published 256
            pos_trans = self.pos_trans_norm(self.pos_trans(embedding.to(memory.dtype)))
            query_pos, tgt = torch.split(pos_trans, dim, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, dim, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, inter_references = self.decoder(tgt, reference_points, memory, levels, query_pos)
        return hs, reference_points, inter_references, enc_class, enc_coord_unact
