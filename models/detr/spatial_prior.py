"""Gaussian spatial prior for the decoder's cross-attention (opt-in, ``--spatial_prior gaussian``).

Idea of spatially modulated co-attention (Gao et al., ICCV 2021, "Fast Convergence of DETR with Spatially
Modulated Co-Attention"): each object query attends mostly around the box it currently predicts, which DETR
would otherwise have to learn slowly. This variant adds no parameters (checkpoint keys are unchanged): the box
of decoder layer l - 1, read through the model's own ``bbox_embed``, adds ``-((dx / (w/2))^2 + (dy / (h/2))^2) / 2``
to layer l's attention logits for the token at offset (dx, dy) from the box centre. The first layer's
boxes are fixed anchors spread over the image (``anchor_boxes``), which also breaks the symmetry between
queries from the first step.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["SPATIAL_PRIORS", "anchor_boxes", "gaussian_attention_bias", "token_centers"]

SPATIAL_PRIORS = ("none", "gaussian")


def _halton(index: int, base: int) -> float:
    result, fraction = 0.0, 1.0
    while index > 0:
        fraction /= base
        result += fraction * (index % base)
        index //= base
    return result


@functools.lru_cache(maxsize=8)
def _anchor_rows(num_queries: int) -> tuple[tuple[float, float, float, float], ...]:
    side = min(0.5, 1.0 / math.sqrt(num_queries))
    return tuple((_halton(i + 1, 2), _halton(i + 1, 3), side, side) for i in range(num_queries))


def anchor_boxes(num_queries: int, device: torch.device | None = None) -> Tensor:
    """Fixed reference boxes [Q, 4] for the first decoder layer: query i is centred on the (i+1)-th point of
    the Halton sequence in bases 2 and 3 (evenly spread, the same for any Q), side 1 / sqrt(Q) (so the
    queries tile the image), at most 0.5."""
    return torch.tensor(_anchor_rows(num_queries), dtype=torch.float32, device=device)


def token_centers(mask: Tensor | None, batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """Centres of the feature-map cells in each image's normalised coordinates: [B, H*W, 2] (x, y).

    Coordinates are relative to the unpadded part of each image (as DETR's boxes are), so a padded image's
    valid cells span [0, 1] and its padding lies beyond 1.
    """
    if mask is None:
        valid_w = torch.full((batch,), width, device=device)
        valid_h = torch.full((batch,), height, device=device)
    else:
        valid_w = (~mask[:, 0, :]).sum(-1).clamp(min=1)
        valid_h = (~mask[:, :, 0]).sum(-1).clamp(min=1)
    xs = (torch.arange(width, device=device) + 0.5)[None, :] / valid_w[:, None]  # [B, W]
    ys = (torch.arange(height, device=device) + 0.5)[None, :] / valid_h[:, None]  # [B, H]
    grid_x = xs[:, None, :].expand(batch, height, width)
    grid_y = ys[:, :, None].expand(batch, height, width)
    centers = torch.stack([grid_x, grid_y], dim=-1).reshape(batch, height * width, 2)
    # Smallest half-size of the Gaussian: one cell, so a tiny predicted box still sees its own cell.
    cell = torch.stack([1.0 / valid_w, 1.0 / valid_h], dim=-1).float()  # [B, 2]
    return torch.cat([centers.float(), cell[:, None, :].expand(batch, height * width, 2)], dim=-1)


def gaussian_attention_bias(boxes: Tensor, centers: Tensor) -> Tensor:
    """Additive attention logits [B, Q, HW] from boxes [B, Q, 4] (cx, cy, w, h) and ``token_centers`` output."""
    boxes = boxes.float()
    half = torch.maximum(boxes[..., None, 2:] / 2, centers[:, None, :, 2:])  # [B, Q, HW, 2], at least one cell
    offset = (centers[:, None, :, :2] - boxes[..., None, :2]) / half
    return -0.5 * offset.square().sum(-1)
