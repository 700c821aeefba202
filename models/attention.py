"""Multi-head attention with the published ``nn.MultiheadAttention`` parameters, run by a selectable kernel.

'sdpa' is ``F.scaled_dot_product_attention``, 'math' the plain softmax reference (it also returns the
head-averaged weights, for attention maps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_KERNELS", "MultiheadAttention", "set_attention_kernel"]

ATTENTION_KERNELS = ("sdpa", "math")


class MultiheadAttention(nn.Module):
    """Multi-head attention with one fused input projection, batch-first.

    Same parameters and numbers as ``torch.nn.MultiheadAttention`` (``in_proj_weight`` [3D, D],
    ``in_proj_bias`` [3D], ``out_proj``), computed by the selected kernel.

    Args:
        embed_dim: D.
        num_heads: heads; D must be divisible by it.
        dropout: dropout on the attention weights (training only).
        kernel: 'sdpa' (fused ``F.scaled_dot_product_attention``) or 'math' (explicit softmax reference).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, kernel: str = "sdpa"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"hidden_dim {embed_dim} must be divisible by nheads {num_heads}")
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"--attention {kernel}: expected one of {ATTENTION_KERNELS}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel = kernel
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from queries to keys.

        Args:
            query: [B, Lq, D].
            key: [B, Lk, D].
            value: [B, Lk, D].
            key_padding_mask: [B, Lk] bool, True on keys to ignore (padding).
            attn_bias: [B, Lq, Lk] float added to every head's attention logits (e.g. a spatial prior).

        Returns:
            (output [B, Lq, D], head-averaged attention weights [B, Lq, Lk] with the 'math' kernel, else None).
            The tuple mirrors ``nn.MultiheadAttention`` so forward hooks written for the published model work.
        """
        dim = self.embed_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: q and k share the input, so project them in one matmul
            q, k = F.linear(query, weight[: 2 * dim], bias[: 2 * dim]).chunk(2, dim=-1)
        else:
            q = F.linear(query, weight[:dim], bias[:dim])
            k = F.linear(key, weight[dim : 2 * dim], bias[dim : 2 * dim])
        v = F.linear(value, weight[2 * dim :], bias[2 * dim :])
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        dropout = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if self.kernel == "sdpa":
            if attn_bias is None:
                # SDPA's boolean mask marks the keys to attend to, the opposite of a padding mask.
                attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            else:
                attend = attn_bias[:, None].to(q.dtype)
                if key_padding_mask is not None:
                    attend = attend.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if attn_bias is not None:
                scores = scores + attn_bias[:, None].to(scores.dtype)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            probs = scores.softmax(dim=-1)
            weights = probs.mean(dim=1)
            out = F.dropout(probs, p=dropout) @ v
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], dim)
        return self.out_proj(out), weights


def set_attention_kernel(module: nn.Module, kernel: str) -> None:
    """Switch every ``MultiheadAttention`` inside ``module`` to 'sdpa' or 'math' (weights unchanged)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}")
    for sub in module.modules():
        if isinstance(sub, MultiheadAttention):
            sub.kernel = kernel
