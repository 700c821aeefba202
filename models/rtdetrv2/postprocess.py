"""RT-DETRv2's post-processor: top-k (query, class) pairs by sigmoid score, labels mapped to category ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from models.postprocess import PostProcessTopK

__all__ = ["COCO_CATEGORY_IDS", "RTDETRPostProcessor"]

# The 80 COCO 2017 category ids in ascending order: label i (0..79) <-> COCO_CATEGORY_IDS[i]
# (the published remap_mscoco_category).
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


class RTDETRPostProcessor(PostProcessTopK):
    """Per image the ``num_select`` best of the flattened K x C sigmoid scores (query = i // C, label = i % C),
    boxes cxcywh -> absolute xyxy; no NMS. With ``category_ids`` the labels become ``category_ids[label]``.

    Args:
        num_select: detections per image (300).
        category_ids: C ids (e.g. :data:`COCO_CATEGORY_IDS` for remap_mscoco_category), or None (labels stay).
    """

    def __init__(self, num_select: int = 300, category_ids: Sequence[int] | None = None):
        super().__init__(num_select=num_select)
        ids = torch.as_tensor(list(category_ids), dtype=torch.int64) if category_ids is not None else None
        self.register_buffer("category_ids", ids, persistent=False)

    def set_category_ids(self, category_ids: Sequence[int] | None, num_classes: int | None = None) -> None:
        """Report label i as ``category_ids[i]`` (the dataset's sorted ids); None: labels stay class indices.

        ``num_classes`` above the number of ids (--num_classes larger than the dataset's categories): the extra
        labels get the ids after the largest one (max + 1, max + 2, ...).
        """
        ids = None
        if category_ids is not None:
            ids = list(category_ids)
            ids += range(max(ids) + 1, max(ids) + 1 + max(0, (num_classes or 0) - len(ids)))
            ids = torch.as_tensor(ids, dtype=torch.int64)
        self.register_buffer("category_ids", ids, persistent=False)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs 'pred_logits' [B, K, C], 'pred_boxes' [B, K, 4] normalised cxcywh; target_sizes [B, 2] (h, w).

        Returns B dicts 'scores' [N], 'labels' int64 [N], 'boxes' [N, 4] absolute x0, y0, x1, y1, scores descending.
        """
        results = super().forward(outputs, target_sizes)
        if self.category_ids is None:
            return results
        num_classes = outputs["pred_logits"].shape[-1]
        if len(self.category_ids) != num_classes:
            raise ValueError(f"RTDETRPostProcessor: {len(self.category_ids)} category ids for {num_classes} classes")
        ids = self.category_ids.to(outputs["pred_logits"].device)
        return [{**r, "labels": ids[r["labels"]]} for r in results]
