"""DETR encoder-decoder transformer (paper section 3.2), batch-first inside.

Parameter names equal the published model's (``self_attn.in_proj_weight``, ``multihead_attn``, ``linear1``,
``norm1`` ...), so published checkpoints load unchanged. Attention: ``models.attention.MultiheadAttention``. The
encoder layer is the shared ``models.transformer_layers.TransformerEncoderLayer`` (re-exported here).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import MultiheadAttention
from ..transformer_layers import TransformerEncoderLayer
from .spatial_prior import gaussian_attention_bias, token_centers

if TYPE_CHECKING:
    from .settings import DETRSettings

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "build_transformer",
]

# The spatial prior's box head: (normalised decoder output [B, Q, D], previous boxes [B, Q, 4] or None) -> boxes
# [B, Q, 4] in [0, 1]. Typed Any rather than Callable because TorchScript cannot parse a Callable annotation; a
# scripted model never receives one (the prior is eager / torch.export only, see ``DETR.__prepare_scriptable__``).
BoxHead = Any


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the encoder memory, ReLU feed-forward."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        attention: str = "sdpa",
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, kernel=attention)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, kernel=attention)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
        cross_attn_bias: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos: [B, Q, D]; memory, pos: [B, HW, D]; mask: [B, HW]; bias: [B, Q, HW] -> [B, Q, D]."""
        memory_key = memory if pos is None else memory + pos
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = x if query_pos is None else x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, k, x)[0])
            x = self.norm2(tgt)
            q = x if query_pos is None else x + query_pos
            cross = self.multihead_attn(q, memory_key, memory, memory_key_padding_mask, cross_attn_bias)[0]
            tgt = tgt + self.dropout2(cross)
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        q = k = tgt if query_pos is None else tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)[0]))
        q = tgt if query_pos is None else tgt + query_pos
        cross = self.multihead_attn(q, memory_key, memory, memory_key_padding_mask, cross_attn_bias)[0]
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm only in the pre-norm variant."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """src, pos: [B, HW, D]; key_padding_mask: [B, HW] -> memory [B, HW, D]."""
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; every returned output goes through the final LayerNorm."""

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer,
        num_layers: int,
        norm: nn.Module,
        return_intermediate: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
        box_head: BoxHead | None = None,
        centers: Tensor | None = None,
        initial_boxes: Tensor | None = None,
    ) -> Tensor:
        """Returns [L, B, Q, D] (every layer) with return_intermediate, else [1, B, Q, D] (last layer).

        With ``box_head`` ((normalised decoder output, previous layer's boxes or None) -> boxes in [0, 1]) and
        ``centers`` (``token_centers``), every layer gets the Gaussian spatial prior of the previous layer's
        boxes (no gradient); the first layer's come from ``initial_boxes`` [B, Q, 4] (none: no prior there).
        """
        outputs: list[Tensor] = []
        boxes = initial_boxes
        bias: Tensor | None = None
        if not torch.jit.is_scripting():
            if boxes is not None and box_head is not None:
                bias = gaussian_attention_bias(boxes, centers)
        for index, layer in enumerate(self.layers):
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, bias)
            last = index == len(self.layers) - 1
            # Only the outputs that are used go through the final norm (no `continue`: TorchScript unrolls this loop).
            if self.return_intermediate or last or box_head is not None:
                normed = self.norm(tgt)
                if self.return_intermediate or last:
                    outputs.append(normed)
                if not torch.jit.is_scripting():
                    if box_head is not None and not last:
                        with torch.no_grad():
                            boxes = box_head(normed, boxes)
                            bias = gaussian_attention_bias(boxes, centers)
        return torch.stack(outputs)


class Transformer(nn.Module):
    """DETR encoder-decoder.

    Args:
        d_model: hidden size D.
        nhead: attention heads.
        num_encoder_layers / num_decoder_layers: stack depths.
        dim_feedforward: feed-forward hidden size.
        dropout: dropout in attention weights, residual branches and feed-forward.
        normalize_before: pre-norm layers (adds ``encoder.norm``).
        return_intermediate_dec: return every decoder layer's (normalised) output, for auxiliary losses.
        attention: 'sdpa' or 'math' (see ``MultiheadAttention``).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
        attention: str = "sdpa",
    ):
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(f"--dec_layers must be at least 1, got {num_decoder_layers}")
        encoder_layer = TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, normalize_before=normalize_before, attention=attention
        )
        self.encoder = TransformerEncoder(
            encoder_layer, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None
        )
        decoder_layer = TransformerDecoderLayer(
            d_model, nhead, dim_feedforward, dropout, normalize_before=normalize_before, attention=attention
        )
        self.decoder = TransformerDecoder(
            decoder_layer, num_decoder_layers, nn.LayerNorm(d_model), return_intermediate=return_intermediate_dec
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None,
        query_embed: Tensor,
        pos_embed: Tensor,
        box_head: BoxHead | None = None,
        initial_boxes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode the feature map and decode the object queries.

        Args:
            src: [B, D, H, W] projected backbone features.
            mask: [B, H, W] bool, True on padding (or None).
            query_embed: [Q, D] learned object queries (the decoder input starts at zeros).
            pos_embed: [B, D, H, W] position encoding.
            box_head: the detector's per-layer box predictor (``DETR.prior_box_head``); given, the decoder's
                cross-attention gets the Gaussian spatial prior of ``models.spatial_prior`` (published: None).
            initial_boxes: [B, Q, 4] reference boxes of the first layer's prior (with ``box_head``).

        Returns:
            (hs [L, B, Q, D] decoder outputs after the final norm, memory [B, D, H, W] encoder output).
        """
        batch, dim, height, width = src.shape
        src = src.flatten(2).transpose(1, 2)
        pos = pos_embed.flatten(2).transpose(1, 2)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        key_padding_mask = None if mask is None else mask.flatten(1)
        memory = self.encoder(src, key_padding_mask=key_padding_mask, pos=pos)
        tgt = torch.zeros_like(query_pos)
        centers: Tensor | None = None
        if not torch.jit.is_scripting():
            if box_head is not None:
                centers = token_centers(mask, batch, height, width, src.device)
        hs = self.decoder(
            tgt, memory, memory_key_padding_mask=key_padding_mask, pos=pos, query_pos=query_pos,
            box_head=box_head, centers=centers, initial_boxes=initial_boxes,
        )  # fmt: skip
        return hs, memory.transpose(1, 2).reshape(batch, dim, height, width)


def build_transformer(settings: DETRSettings) -> Transformer:
    """Transformer of the settings (hidden_dim, dropout, nheads, dim_feedforward, enc/dec_layers, pre_norm,
    attention); every decoder layer's output is returned (auxiliary losses)."""
    return Transformer(
        d_model=settings.hidden_dim,
        nhead=settings.nheads,
        num_encoder_layers=settings.enc_layers,
        num_decoder_layers=settings.dec_layers,
        dim_feedforward=settings.dim_feedforward,
        dropout=settings.dropout,
        normalize_before=settings.pre_norm,
        return_intermediate_dec=True,
        attention=settings.attention,
    )
