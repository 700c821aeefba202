"""COCO panoptic evaluation (PQ / SQ / RQ) of PostProcessPanoptic outputs, without panopticapi.

Each prediction is scored against its ground-truth PNG as soon as it arrives, so only small per-category sums
travel between processes and no shared file system is needed. The predicted PNGs and a ``predictions.json``
in the COCO panoptic result format are still written to ``output_dir`` (as the published evaluator does)
unless ``output_dir`` is None.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from datasets.panoptic_quality import CategoryStats, merge_stats, pq_average, pq_image_stats, read_panoptic_png

__all__ = ["PanopticEvaluator", "format_pq_table", "read_panoptic_png"]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class PanopticEvaluator:
    """Accumulates panoptic predictions and computes PQ, SQ and RQ (All / Things / Stuff).

    Args:
        ann_file: ground-truth ``panoptic_{split}2017.json``.
        ann_folder: folder of the ground-truth PNGs named by each annotation's ``file_name``.
        output_dir: where predicted PNGs and ``predictions.json`` are written (None: write nothing).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        ann_folder: str | os.PathLike,
        output_dir: str | os.PathLike | None = "panoptic_eval",
    ):
        self.gt_json = Path(ann_file)
        self.gt_folder = Path(ann_folder)
        try:
            with open(self.gt_json) as f:
                gt = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read panoptic annotations {self.gt_json}: {error}") from error
        for field in ("annotations", "categories"):
            if field not in gt:
                raise ValueError(f"{self.gt_json}: missing '{field}'; expected a COCO panoptic annotation file")
        self.is_thing = {int(c["id"]): bool(c.get("isthing", 1)) for c in gt["categories"]}
        self.gt_annotations = {int(a["image_id"]): a for a in gt["annotations"]}
        self.output_dir = None if output_dir is None else Path(output_dir)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.predictions: list[dict] = []
        self.image_stats: dict[int, CategoryStats] = {}

    def update(self, predictions: Iterable[Mapping]) -> None:
        """Score predictions ``[{'image_id', 'png_string', 'segments_info', optional 'file_name'}]``."""
        for prediction in predictions:
            image_id = int(prediction["image_id"])
            gt = self.gt_annotations.get(image_id)
            if gt is None:
                raise ValueError(f"{self.gt_json}: no panoptic annotation for predicted image_id {image_id}")
            file_name = prediction.get("file_name") or f"{image_id:012d}.png"
            png = prediction["png_string"]
            if self.output_dir is not None:
                (self.output_dir / file_name).write_bytes(png)
            gt_ids = read_panoptic_png(self.gt_folder / gt["file_name"])
            self.image_stats[image_id] = pq_image_stats(
                gt_ids,
                gt["segments_info"],
                read_panoptic_png(png),
                prediction["segments_info"],
                image=f"image_id {image_id}",
            )
            entry = {k: v for k, v in prediction.items() if k != "png_string"}
            entry.update(image_id=image_id, file_name=file_name)
            self.predictions.append(entry)

    def synchronize_between_processes(self) -> None:
        """Gather every process's statistics and predictions (no-op without an initialised process group)."""
        if not _dist_ready():
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.image_stats, self.predictions))
        self.image_stats, self.predictions, seen = {}, [], set()
        for stats, predictions in gathered:
            # Samplers pad the last batch by repeating images: keep one copy per image id.
            self.image_stats.update(stats)
            for p in predictions:
                if p["image_id"] not in seen:
                    seen.add(p["image_id"])
                    self.predictions.append(p)

    def summarize(self) -> dict:
        """PQ over the images seen so far.

        Returns:
            {'All' | 'Things' | 'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {category_id: {'pq', 'sq', 'rq'}}}
            (values in [0, 1], as panopticapi's ``pq_compute``), plus 'n_images'.
        """
        missing = len(set(self.gt_annotations) - set(self.image_stats))
        if missing:
            warnings.warn(
                f"panoptic evaluation: {missing} of {len(self.gt_annotations)} images in {self.gt_json} have no "
                "prediction; PQ covers the predicted images only",
                stacklevel=2,
            )
        if self.output_dir is not None and _is_main_process():
            with open(self.output_dir / "predictions.json", "w") as f:
                json.dump({"annotations": self.predictions}, f, default=_to_json)
        total: CategoryStats = {}
        for stats in self.image_stats.values():
            merge_stats(total, stats)
        results = pq_average(total, self.is_thing)
        results["n_images"] = len(self.image_stats)
        return results


def _to_json(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to predictions.json")


def format_pq_table(results: Mapping) -> str:
    """Human-readable PQ table (percent) of ``PanopticEvaluator.summarize()`` results."""
    lines = [f"{'':10s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'N':>6s}"]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}{100 * r['pq']:8.2f}{100 * r['sq']:8.2f}{100 * r['rq']:8.2f}{r['n']:6d}")
    return "\n".join(lines)
