"""Post-processing of DETRsegm outputs: binary instance masks (COCO segm) and panoptic PNGs (COCO panoptic format).

Import these from ``models.detr.segmentation`` (beside the mask head, as published).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

__all__ = ["PostProcessPanoptic", "PostProcessSegm"]

# Segments of this many pixels or fewer (at the output size) are dropped, as published.
MIN_SEGMENT_AREA = 4


def _to_pairs(sizes: Tensor | Sequence) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in (sizes.tolist() if isinstance(sizes, Tensor) else sizes)]


class PostProcessSegm(nn.Module):
    """Binary instance masks at the original image size, added to the 'bbox' post-processor's results.

    Args:
        threshold: sigmoid probability above which a pixel belongs to the mask.
    """

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(
        self, results: list[dict], outputs: dict, orig_target_sizes: Tensor, max_target_sizes: Tensor
    ) -> list[dict]:
        """Add 'masks' to each image's results.

        Args:
            results: per-image dicts from the 'bbox' post-processor (updated in place and returned).
            outputs: model outputs with 'pred_masks' [B, Q, H_4, W_4] logits.
            orig_target_sizes: [B, 2] (h, w) original image sizes.
            max_target_sizes: [B, 2] (h, w) sizes of the images fed to the model (before padding).

        Returns:
            ``results`` with 'masks' uint8 [Q, 1, h, w] in {0, 1} at each original size (on the CPU).
        """
        if len(orig_target_sizes) != len(max_target_sizes):
            raise ValueError("orig_target_sizes and max_target_sizes must have one row per image")
        max_sizes = _to_pairs(max_target_sizes)
        orig_sizes = _to_pairs(orig_target_sizes)
        padded = (max(h for h, _ in max_sizes), max(w for _, w in max_sizes))
        masks = F.interpolate(outputs["pred_masks"], size=padded, mode="bilinear", align_corners=False)
        masks = (masks.sigmoid() > self.threshold).cpu()
        for result, mask, (h, w), orig in zip(results, masks, max_sizes, orig_sizes):
            mask = mask[:, None, :h, :w].to(torch.uint8)
            result["masks"] = F.interpolate(mask, size=orig, mode="nearest").to(torch.uint8)
        return results


class PostProcessPanoptic(nn.Module):
    """Panoptic segmentation in the COCO panoptic result format.

    Queries whose most likely class is not "no object" and scores above ``threshold`` are kept; each pixel goes to
    the kept query with the highest mask logit; queries of one stuff class are merged into one segment; segments
    of at most 4 pixels at the output size are dropped (and their pixels reassigned) until none is left.
    Unlike the published code, a merged stuff segment keeps all of its queries' pixels (there, the merged-away
    queries counted as empty segments and were dropped, handing their pixels to other queries).

    Args:
        is_thing_map: {category_id: True for things, False for stuff} (unknown ids count as things).
        threshold: minimum class probability of a kept query.
    """

    def __init__(self, is_thing_map: Mapping[int, bool] | Sequence[bool], threshold: float = 0.85):
        super().__init__()
        self.is_thing_map = is_thing_map
        self.threshold = threshold

    def _is_thing(self, label: int) -> bool:
        try:
            return bool(self.is_thing_map[label])
        except (KeyError, IndexError):
            return True

    @torch.no_grad()
    def forward(
        self, outputs: dict, processed_sizes: Tensor | Sequence, target_sizes: Tensor | Sequence | None = None
    ) -> list[dict]:
        """Panoptic predictions per image.

        Args:
            outputs: model outputs with 'pred_logits' [B, Q, K + 1] and 'pred_masks' [B, Q, H_4, W_4].
            processed_sizes: [B, 2] (h, w) sizes of the images fed to the model (before padding).
            target_sizes: [B, 2] (h, w) output sizes (default ``processed_sizes``), usually the original sizes.

        Returns:
            per image {'png_string': PNG bytes of the RGB segment-id map (id = R + 256 G + 256^2 B, 0 = void),
            'segments_info': [{'id', 'isthing', 'category_id', 'area'}]}, segment ids starting at 1.
        """
        processed = _to_pairs(processed_sizes)
        targets = processed if target_sizes is None else _to_pairs(target_sizes)
        padded = (max(h for h, _ in processed), max(w for _, w in processed))
        no_object = outputs["pred_logits"].shape[-1] - 1
        predictions = []
        for logits, masks, (h, w), target in zip(outputs["pred_logits"], outputs["pred_masks"], processed, targets):
            scores, labels = logits.softmax(-1).max(-1)
            keep = labels.ne(no_object) & (scores > self.threshold)
            labels, masks = labels[keep], masks[keep]
            if len(labels):
                masks = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)[0, :, :h, :w]
            ids, segments_info = self._segments(masks, labels.tolist(), target)
            predictions.append({"png_string": _encode_png(ids), "segments_info": segments_info})
        return predictions

    def _segments(self, masks: Tensor, labels: list[int], target: tuple[int, int]) -> tuple[Tensor, list[dict]]:
        """[N, h, w] mask logits of kept queries -> ([H, W] segment ids at ``target`` size, segments_info)."""
        count = len(labels)
        alive = list(range(count))
        heads: list[int] = []
        while alive:
            owner = torch.as_tensor(alive, device=masks.device)[masks[alive].argmax(0)]
            # Every query of a stuff class gives its pixels to the class's first surviving query (the group head).
            head_of_stuff: dict[int, int] = {}
            canonical = torch.arange(count, device=masks.device)
            for q in alive:
                if not self._is_thing(labels[q]):
                    canonical[q] = head_of_stuff.setdefault(labels[q], q)
            owner = _resize_nearest(canonical[owner], target)
            area = torch.bincount(owner.flatten(), minlength=count).tolist()
            heads = [q for q in alive if canonical[q] == q]
            small = {q for q in heads if area[q] <= MIN_SEGMENT_AREA}
            if not small:
                break
            alive = [q for q in alive if int(canonical[q]) not in small]
            heads = []
        if not heads:
            return torch.zeros(target, dtype=torch.long), []
        segment_id = torch.zeros(count, dtype=torch.long, device=owner.device)
        segments_info = []
        for rank, q in enumerate(heads, start=1):
            segment_id[q] = rank
            segments_info.append(
                {"id": rank, "isthing": self._is_thing(labels[q]), "category_id": labels[q], "area": area[q]}
            )
        return segment_id[owner].cpu(), segments_info


def _resize_nearest(ids: Tensor, size: tuple[int, int]) -> Tensor:
    """[h, w] integer map -> [H, W] by nearest neighbour (pixel-centre sampling, like PIL's NEAREST)."""
    if tuple(ids.shape) == tuple(size):
        return ids
    # float32 holds the query indices (< 2^24) exactly.
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def _encode_png(ids: Tensor) -> bytes:
    """[H, W] segment ids -> PNG bytes of the RGB encoding (R + 256 G + 256^2 B)."""
    ids = ids.numpy().astype(np.int64)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
    with io.BytesIO() as stream:
        Image.fromarray(rgb).save(stream, format="PNG")
        return stream.getvalue()
