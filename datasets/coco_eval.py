"""COCO box and mask evaluation over pycocotools (or faster-coco-eval), gathered from every process.

Predictions are kept in the COCO results format (the JSON a user can submit or re-score), so the numbers
are exactly those of pycocotools' ``COCOeval`` run on the dumped file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util import distributed as dist_utils

BACKENDS = ("pycocotools", "faster")
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (pycocotools' loadRes fails on an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def _make_cocoeval(backend: str, coco_gt: COCO, results: list[dict], iou_type: str):
    """Build an evaluation object of ``backend`` for ``results`` (COCO results format; may be empty).

    loadRes adds keys (id, area, bbox) to each result dict: a shallow copy per dict keeps ``results`` clean at a
    fraction of a deep copy's cost (which was most of the faster backend's time).
    """
    if backend == "pycocotools":
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        return COCOeval(coco_gt, coco_dt, iouType=iou_type)
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        gt = FasterCOCO(coco_gt.dataset)
        return COCOeval_faster(gt, gt.loadRes([dict(r) for r in results]), iouType=iou_type)
    raise ValueError(f"unknown eval backend '{backend}'; choose one of {BACKENDS}")


class CocoEvaluator:
    """Accumulates per-image predictions and scores them with COCO metrics.

    Args:
        coco_gt: ground-truth ``pycocotools.coco.COCO`` object (``datasets.get_coco_api_from_dataset``).
        iou_types: any of 'bbox', 'segm'.
        backend: 'pycocotools' (default, the reference numbers) or 'faster' (faster-coco-eval).

    Attributes:
        coco_eval: {iou_type: COCOeval}; after ``accumulate()``+``summarize()`` each has the 12 ``stats``.
        img_ids: image ids seen (sorted and unique after synchronisation).
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str], backend: str = "pycocotools") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown eval backend '{backend}'; choose one of {BACKENDS}")
        for iou_type in iou_types:
            if iou_type not in ("bbox", "segm"):
                raise ValueError(f"unsupported iou type '{iou_type}' (bbox or segm)")
        self.coco_gt = coco_gt
        self.iou_types = list(iou_types)
        self.backend = backend
        self.img_ids: list[int] = []
        # {iou_type: {image_id: [result dicts]}}: keyed by image so duplicates from padded samplers merge.
        self._results: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        self.coco_eval: dict[str, Any] = {}

    def update(self, predictions: dict[int, dict[str, torch.Tensor]]) -> None:
        """Add predictions ``{image_id: {'scores' [N], 'labels' [N], 'boxes' [N,4] abs x0y0x1y1, 'masks'?}}``.

        'masks' ([N, 1, H, W] uint8 or bool, original image size) is needed for 'segm'.
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            self.img_ids.append(image_id)
            for iou_type in self.iou_types:
                self._results[iou_type][image_id] = self._convert(image_id, prediction, iou_type)

    @staticmethod
    def _convert(image_id: int, prediction: dict[str, torch.Tensor], iou_type: str) -> list[dict]:
        scores = prediction["scores"].detach().float().cpu().tolist()
        labels = prediction["labels"].detach().cpu().tolist()
        if iou_type == "bbox":
            boxes = prediction["boxes"].detach().float().cpu()
            boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()  # to x, y, w, h
            return [
                {"image_id": image_id, "category_id": int(c), "bbox": b, "score": s}
                for c, b, s in zip(labels, boxes, scores)
            ]
        masks = prediction["masks"].detach().cpu().numpy() > 0
        results = []
        for mask, c, s in zip(masks, labels, scores):
            rle = mask_util.encode(np.asfortranarray(mask[0].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
            results.append({"image_id": image_id, "category_id": int(c), "segmentation": rle, "score": s})
        return results

    def synchronize_between_processes(self) -> None:
        """Gather the predictions of every process (each then holds all of them); duplicates collapse."""
        gathered = dist_utils.all_gather_object((self.img_ids, self._results))
        img_ids: set[int] = set()
        merged: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        for ids, results in gathered:
            img_ids.update(ids)
            for iou_type in self.iou_types:
                merged[iou_type].update(results[iou_type])
        self.img_ids = sorted(img_ids)
        self._results = merged

    def results_json(self, iou_type: str) -> list[dict]:
        """Predictions of ``iou_type`` in the COCO results format, ordered by image id."""
        return [r for image_id in sorted(self._results[iou_type]) for r in self._results[iou_type][image_id]]

    def dump_results(self, path: str | Path, iou_type: str = "bbox") -> Path:
        """Write ``results_json(iou_type)`` to ``path`` (what ``COCO.loadRes`` reads)."""
        path = Path(path)
        path.write_text(json.dumps(self.results_json(iou_type)), encoding="utf-8")
        return path

    def accumulate(self) -> None:
        """Run per-image matching and accumulation for every iou type (quietly)."""
        image_ids = sorted(set(self.img_ids))
        for iou_type in self.iou_types:
            coco_eval = _make_cocoeval(self.backend, self.coco_gt, self.results_json(iou_type), iou_type)
            coco_eval.params.imgIds = image_ids
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.evaluate()
                coco_eval.accumulate()
            self.coco_eval[iou_type] = coco_eval

    def summarize(self, verbose: bool = True) -> None:
        """Compute the 12 stats of each iou type (printing the standard table when ``verbose``)."""
        for iou_type, coco_eval in self.coco_eval.items():
            if verbose:
                print(f"IoU metric: {iou_type}")
                if hasattr(coco_eval, "print_function"):  # faster-coco-eval logs its table at INFO by default
                    coco_eval.print_function = print
                coco_eval.summarize()
            else:
                with contextlib.redirect_stdout(io.StringIO()):
                    coco_eval.summarize()

    def stats(self, iou_type: str = "bbox") -> list[float]:
        """The 12 COCO numbers of ``iou_type`` as plain floats (after ``summarize``)."""
        return [float(x) for x in np.asarray(self.coco_eval[iou_type].stats)[:12]]


def per_category_ap(coco_eval: COCOeval) -> list[tuple[int, str, float]]:
    """AP (IoU .50:.95, all areas, 100 detections) per category: [(category_id, name, AP or nan)].

    A category without ground truth in the evaluated images gets nan.
    """
    precision = np.asarray(coco_eval.eval["precision"])  # [T, R, K, A, M]
    cats = coco_eval.cocoGt.cats
    rows = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        ap = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        rows.append((int(cat_id), str(cats.get(cat_id, {}).get("name", cat_id)), ap))
    return rows


def format_per_category_table(rows: Iterable[tuple[int, str, float]], columns: int = 3) -> str:
    """A plain-text table of ``per_category_ap`` rows, ``columns`` categories per line."""
    cells = [f"{name[:18]:<18} {'  -  ' if np.isnan(ap) else f'{ap:5.3f}'}" for _, name, ap in rows]
    header = " | ".join([f"{'category':<18} {'AP':>5}"] * min(columns, max(len(cells), 1)))
    lines = [header, "-" * len(header)]
    for i in range(0, len(cells), columns):
        lines.append(" | ".join(cells[i : i + columns]))
    return "\n".join(lines)
