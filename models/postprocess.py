"""Conversion of the model output to COCO-style detections in original image coordinates."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy

__all__ = ["PostProcess"]


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
        if len(logits) != len(target_sizes) or target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(
                f"PostProcess: target_sizes must be [B, 2] (h, w) with B={len(logits)}, got {tuple(target_sizes.shape)}"
            )
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        height, width = target_sizes.to(boxes.device, torch.float32).unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)
        boxes = box_cxcywh_to_xyxy(boxes.float()) * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
