"""Independent plain-Python references shared by the loss and matcher tests (scalar GIoU, focal loss)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def cxcywh_to_xyxy(box: Sequence[float]) -> list[float]:
    cx, cy, w, h = box
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def giou_xyxy(a: Sequence[float], b: Sequence[float], eps: float = 0.0) -> float:
    """GIoU of two x0y0x1y1 boxes; ``eps`` > 0 gives DINO's IoU = inter / (union + eps), GIoU = IoU - (C - union) /
    (C + eps)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def giou_cxcywh(a: Sequence[float], b: Sequence[float], eps: float = 0.0) -> float:
    return giou_xyxy(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b), eps)


def focal_term(x: float, y: float, alpha: float = 0.25) -> float:
    """Sigmoid focal loss of one logit x with target y (Lin et al. 2017, gamma 2)."""
    p = 1 / (1 + math.exp(-x))
    p_t = p if y else 1 - p
    alpha_t = alpha if y else 1 - alpha
    return -alpha_t * (1 - p_t) ** 2 * math.log(p_t)
