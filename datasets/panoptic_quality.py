"""Panoptic quality (Kirillov et al. 2019): per-image matching statistics, category averages, the PNG id codec.

The rules are those of the COCO panoptic evaluation (the panopticapi package, which is not on PyPI):

- Segment ids come from PNGs with ``id = R + 256 * G + 256**2 * B``; id 0 is VOID. Ground-truth pixels whose id
  is not listed in the annotation are treated as VOID too.
- A prediction and a non-crowd ground truth of the same category match when
  ``IoU = inter / (pred_area + gt_area - inter - pred_pixels_on_gt_void) > 0.5`` (unique by construction).
- Unmatched non-crowd ground truths are false negatives. An unmatched prediction is a false positive unless more
  than half of its area lies on VOID plus crowd regions of its own category.
- PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP, RQ = TP / (TP + FP/2 + FN/2), computed per
  category and averaged over the categories that occur (TP + FP + FN > 0), for All, Things and Stuff.

Ground-truth areas come from the annotation's ``area`` field when present (as panopticapi does), prediction
areas from the PNG.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

VOID = 0
# Pairs (gt id, pred id) are packed into one integer; ids are below 256**3 by the RGB encoding.
_OFFSET = 256**3

# Per-category accumulator layout: [sum of IoU over matches, TP, FP, FN].
CategoryStats = dict[int, list[float]]


def rgb_to_id(color: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB panoptic PNG -> [H, W] int64 segment ids (``R + 256 G + 256^2 B``)."""
    if color.ndim != 3 or color.shape[-1] < 3:
        raise ValueError(f"panoptic PNG must be RGB [H, W, 3], got shape {tuple(color.shape)}")
    color = color[..., :3].astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] integer segment ids -> [H, W, 3] uint8 RGB (inverse of ``rgb_to_id``)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256) % 256], axis=-1).astype(np.uint8)


def read_panoptic_png(source: str | os.PathLike | bytes) -> np.ndarray:
    """Panoptic PNG (path or encoded bytes) -> [H, W] int64 segment ids."""
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with Image.open(stream) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def _pair_counts(gt_ids: np.ndarray, pred_ids: np.ndarray) -> dict[tuple[int, int], int]:
    keys, counts = np.unique(gt_ids.astype(np.uint64) * _OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    return {(int(k // _OFFSET), int(k % _OFFSET)): int(c) for k, c in zip(keys, counts)}


def pq_image_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping],
    image: str = "image",
) -> CategoryStats:
    """Matching statistics of one image.

    Args:
        gt_ids: [H, W] ground-truth segment ids (0 = VOID).
        gt_segments: ground-truth ``segments_info`` ({'id', 'category_id', 'iscrowd', optional 'area'}).
        pred_ids: [H, W] predicted segment ids; pixels with id 0 not listed in ``pred_segments`` are unlabelled.
        pred_segments: predicted ``segments_info`` ({'id', 'category_id'}).
        image: name used in error messages.

    Returns:
        {category_id: [iou_sum, tp, fp, fn]} for the categories touched by this image.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"{image}: predicted panoptic PNG is {pred_ids.shape[1]}x{pred_ids.shape[0]} but the ground truth is "
            f"{gt_ids.shape[1]}x{gt_ids.shape[0]}; predictions must be at the original image size"
        )
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): s for s in pred_segments}
    if len(pred) != len(pred_segments):
        raise ValueError(f"{image}: duplicate segment ids in the predicted segments_info")

    gt_ids = np.where(np.isin(gt_ids, list(gt)), gt_ids, VOID)
    pred_area: dict[int, int] = {}
    for seg_id, count in zip(*np.unique(pred_ids, return_counts=True)):
        seg_id = int(seg_id)
        if seg_id not in pred:
            if seg_id == VOID:
                continue
            raise ValueError(f"{image}: segment id {seg_id} is in the predicted PNG but not in segments_info")
        pred_area[seg_id] = int(count)
    missing = sorted(set(pred) - set(pred_area))
    if missing:
        raise ValueError(f"{image}: predicted segments {missing} are in segments_info but absent from the PNG")
    gt_area = {i: int(s.get("area", 0)) or int((gt_ids == i).sum()) for i, s in gt.items()}

    pairs = _pair_counts(gt_ids, pred_ids)
    stats: CategoryStats = {}

    def add(category: int, iou: float = 0.0, tp: int = 0, fp: int = 0, fn: int = 0) -> None:
        entry = stats.setdefault(int(category), [0.0, 0, 0, 0])
        entry[0] += iou
        entry[1] += tp
        entry[2] += fp
        entry[3] += fn

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_id, pred_id), inter in pairs.items():
        if gt_id not in gt or pred_id not in pred:
            continue
        g, p = gt[gt_id], pred[pred_id]
        if g.get("iscrowd", 0) == 1 or int(g["category_id"]) != int(p["category_id"]):
            continue
        union = pred_area[pred_id] + gt_area[gt_id] - inter - pairs.get((VOID, pred_id), 0)
        iou = inter / union
        if iou > 0.5:
            add(g["category_id"], iou=iou, tp=1)
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    crowd_by_category: dict[int, list[int]] = {}
    for gt_id, g in gt.items():
        if gt_id in gt_matched:
            continue
        if g.get("iscrowd", 0) == 1:
            crowd_by_category.setdefault(int(g["category_id"]), []).append(gt_id)
            continue
        add(g["category_id"], fn=1)

    for pred_id, p in pred.items():
        if pred_id in pred_matched:
            continue
        ignored = pairs.get((VOID, pred_id), 0)
        for crowd_id in crowd_by_category.get(int(p["category_id"]), []):
            ignored += pairs.get((crowd_id, pred_id), 0)
        if ignored / pred_area[pred_id] > 0.5:
            continue
        add(p["category_id"], fp=1)
    return stats


def merge_stats(into: CategoryStats, other: Mapping[int, Sequence[float]]) -> CategoryStats:
    """Add the per-category statistics ``other`` into ``into`` (in place) and return it."""
    for category, values in other.items():
        entry = into.setdefault(int(category), [0.0, 0, 0, 0])
        for k in range(4):
            entry[k] += values[k]
    return into


def pq_average(stats: Mapping[int, Sequence[float]], is_thing: Mapping[int, bool]) -> dict:
    """Average per-category PQ, SQ, RQ over the categories of ``is_thing`` that occur.

    Args:
        stats: {category_id: [iou_sum, tp, fp, fn]} summed over the dataset.
        is_thing: {category_id: isthing} of the ground-truth categories; other categories are not averaged.

    Returns:
        {'All' | 'Things' | 'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {category_id: {'pq', 'sq', 'rq'}}}
        with values in [0, 1] (0 when no category occurs).
    """
    per_class: dict[int, dict[str, float]] = {}
    for category in is_thing:
        iou, tp, fp, fn = stats.get(category, (0.0, 0, 0, 0))
        denominator = tp + 0.5 * fp + 0.5 * fn
        if tp + fp + fn == 0:
            per_class[category] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        per_class[category] = {
            "pq": iou / denominator,
            "sq": iou / tp if tp else 0.0,
            "rq": tp / denominator,
        }
    occurs = {c for c in is_thing if c in stats and sum(stats[c][1:]) > 0}
    results: dict = {}
    for name, want in (("All", None), ("Things", True), ("Stuff", False)):
        chosen = [c for c in occurs if want is None or bool(is_thing[c]) == want]
        n = len(chosen)
        results[name] = {key: sum(per_class[c][key] for c in chosen) / n if n else 0.0 for key in ("pq", "sq", "rq")}
        results[name]["n"] = n
    results["per_class"] = per_class
    return results
