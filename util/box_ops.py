"""Box conversions and overlap measures with the published DETR names, on top of torchvision.ops.

Box formats: ``xyxy`` is (x0, y0, x1, y1); ``cxcywh`` is (center x, center y, width, height).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import ops

# Denominator floor: degenerate (zero-area) boxes give finite values and gradients, not NaN.
_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    return ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    return ops.box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def check_boxes_xyxy(boxes: Tensor, what: str) -> None:
    """Raise ValueError if any xyxy box is inverted (x1 < x0 or y1 < y0) or not finite."""
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{what}: boxes contain NaN or inf values")
    if (boxes[..., 2:] < boxes[..., :2]).any():
        bad = (boxes[..., 2:] < boxes[..., :2]).any(-1).nonzero()[0].tolist()
        raise ValueError(
            f"{what}: inverted box (x1 < x0 or y1 < y0) at index {bad}; boxes must be x0,y0,x1,y1 with x1>=x0, y1>=y0"
        )


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    area1 = ops.box_area(boxes1) if boxes1.ndim == 2 else _area(boxes1)
    area2 = ops.box_area(boxes2) if boxes2.ndim == 2 else _area(boxes2)
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter, union


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes: [..., N, 4], [..., M, 4] -> (iou [..., N, M], union [..., N, M]).

    ``eps`` None divides by the union floored at 1e-7 (DETR); a number divides by union + eps (DINO: 1e-6).
    """
    inter, union = _inter_union(boxes1, boxes2)
    # DINO adds its eps even to non-degenerate unions, which changes every value slightly.
    return inter / (union.clamp(min=_EPS) if eps is None else union + eps), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float | None = None) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: [..., N, 4], [..., M, 4] -> [..., N, M].

    Zero-width or zero-height boxes give finite values: with ``eps`` None the denominators are floored at 1e-7
    (DETR); with a number, eps is added to them (DINO's IoU = inter / (union + 1e-6) and
    GIoU = IoU - (enclosing - union) / (enclosing + 1e-6)).
    """
    iou, union = box_iou(boxes1, boxes2, eps)
    top_left = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    if eps is None:
        enclosing = enclosing.clamp(min=_EPS)
        return iou - (enclosing - union) / enclosing
    return iou - (enclosing - union) / (enclosing + eps)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = _EPS) -> Tensor:
    """GIoU of matched pairs of xyxy boxes: [N, 4], [N, 4] -> [N] (no N x N matrix is built).

    Denominators get ``+ eps`` (1e-7 for DETR and Deformable DETR, 1e-6 for DINO).
    """
    return 1.0 - ops.generalized_box_iou_loss(boxes1, boxes2, reduction="none", eps=eps)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """[N, H, W] binary masks -> [N, 4] xyxy boxes (all zeros for an empty mask)."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device, dtype=torch.float)
    boxes = ops.masks_to_boxes(masks.bool())
    empty = ~masks.flatten(1).bool().any(1)
    boxes[empty] = 0
    return boxes
