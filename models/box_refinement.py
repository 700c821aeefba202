"""Iterative bounding-box refinement in logit space (Deformable DETR section 4.1, DINO's look-forward-twice).

A head predicts an offset to the inverse sigmoid of a reference; the refined box is the sigmoid of the sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFORMABLE_EPS", "DINO_EPS", "inverse_sigmoid", "refine_boxes"]

# Published clamps: Deformable DETR's inverse_sigmoid uses 1e-5, DINO's 1e-3 (both change numbers near 0 and 1).
DEFORMABLE_EPS = 1e-5
DINO_EPS = 1e-3


def inverse_sigmoid(x: Tensor, eps: float = DEFORMABLE_EPS) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both x and 1 - x to at least ``eps``.

    Not ``torch.logit(x, eps)``: that clamps x to [eps, 1 - eps], which differs from the published clamp by up to
    eps in the denominator.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(delta: Tensor, reference: Tensor, eps: float = DEFORMABLE_EPS) -> Tensor:
    """Boxes [..., 4] (sigmoid cx, cy, w, h) from a head output ``delta`` [..., 4] and a reference.

    Args:
        delta: unactivated head output.
        reference: [..., 4] reference boxes, or [..., 2] reference points (only cx, cy get the offset; w, h come
            from the head alone), in [0, 1].
        eps: the inverse-sigmoid clamp.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    if reference.shape[-1] != 2:
        raise ValueError(f"refine_boxes: reference must end in 2 or 4 coordinates, got {tuple(reference.shape)}")
    centre = delta[..., :2] + inverse_sigmoid(reference, eps)
    return torch.cat((centre, delta[..., 2:]), dim=-1).sigmoid()
