"""The transformer encoder layer shared by the families: DETR's encoder (ReLU, post- or pre-norm) and RT-DETRv2's
AIFI (GELU, post-norm) are the same block.

Parameter names are the published ones (``self_attn.in_proj_weight``, ``self_attn.out_proj``, ``linear1``,
``linear2``, ``norm1``, ``norm2``), so both families' checkpoints load unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention

__all__ = ["ACTIVATIONS", "TransformerEncoderLayer"]

ACTIVATIONS = ("relu", "gelu")


class TransformerEncoderLayer(nn.Module):
    """Self-attention (q = k = src + pos, v = src) + feed-forward block; post-norm (published default) or pre-norm.

    Args:
        d_model: D, the token width.
        nhead: attention heads.
        dim_feedforward: hidden width of the feed-forward block.
        dropout: on the attention weights and after each sub-block.
        normalize_before: pre-norm instead of post-norm.
        attention: the attention kernel, 'sdpa' or 'math' (``models.attention``).
        activation: of the feed-forward block, 'relu' (DETR) or 'gelu' (RT-DETRv2's AIFI).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        attention: str = "sdpa",
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"encoder layer activation {activation!r}: expected one of {ACTIVATIONS}")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, kernel=attention)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        self.activation = activation

    def _feed_forward(self, x: Tensor) -> Tensor:
        hidden = self.linear1(x)
        hidden = F.gelu(hidden) if self.activation == "gelu" else F.relu(hidden)
        return self.linear2(self.dropout(hidden))

    def forward(self, src: Tensor, key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """src: [B, N, D]; key_padding_mask: [B, N] (True on padding); pos: [B or 1, N, D] -> [B, N, D]."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = x if pos is None else x + pos
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask)[0])
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        q = k = src if pos is None else src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))
