"""Conversion of the model output to COCO-style detections in original image coordinates.

``PostProcess`` scores softmax logits with a "no object" entry (one detection per query); ``PostProcessTopK``
sigmoid logits (the top-k (query, class) pairs of the image). Each family's folder publishes its one as
``PostProcess``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy

__all__ = ["PostProcess", "PostProcessTopK"]


def _check_target_sizes(name: str, batch: int, target_sizes: Tensor) -> None:
    if batch != len(target_sizes) or target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
        raise ValueError(f"{name}: target_sizes must be [B, 2] (h, w) with B={batch}, got {tuple(target_sizes.shape)}")


def _scale_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """[B, N, 4] normalised cxcywh -> [B, N, 4] absolute xyxy, target_sizes [B, 2] (h, w)."""
    height, width = target_sizes.to(boxes.device, torch.float32).unbind(1)
    scale = torch.stack([width, height, width, height], dim=1)
    return box_cxcywh_to_xyxy(boxes.float()) * scale[:, None, :]


class PostProcess(nn.Module):
    """Best class (excluding "no object") and its probability for every query, boxes in pixels."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Turn raw outputs into per-image detections.

        Args:
            outputs: 'pred_logits' [B, Q, K + 1], 'pred_boxes' [B, Q, 4] cxcywh normalised to the unpadded image.
            target_sizes: [B, 2] (height, width) of each original image (use the augmented size to evaluate on
                the transformed image).

        Returns:
            B dicts with 'scores' [Q], 'labels' int64 [Q] and 'boxes' [Q, 4] absolute x0, y0, x1, y1.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        _check_target_sizes("PostProcess", len(logits), target_sizes)
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        boxes = _scale_boxes(boxes, target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


class PostProcessTopK(nn.Module):
    """The ``num_select`` best (query, class) pairs of each image by sigmoid score, boxes in pixels.

    Args:
        num_select: detections kept per image (at most Q * K are).
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Turn raw outputs into per-image detections.

        Args:
            outputs: 'pred_logits' [B, Q, K] (sigmoid classes, no "no object"), 'pred_boxes' [B, Q, 4] cxcywh
                normalised to the unpadded image.
            target_sizes: [B, 2] (height, width) of each original image.

        Returns:
            B dicts with 'scores' [N], 'labels' int64 [N] and 'boxes' [N, 4] absolute x0, y0, x1, y1, in
            descending score order (N = min(num_select, Q * K)).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        _check_target_sizes("PostProcessTopK", len(logits), target_sizes)
        batch, num_queries, num_classes = logits.shape
        prob = logits.float().sigmoid().view(batch, -1)
        scores, index = prob.topk(min(self.num_select, num_queries * num_classes), dim=1)
        query = index // num_classes
        labels = index % num_classes
        boxes = _scale_boxes(boxes, target_sizes).gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
