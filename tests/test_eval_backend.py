"""--eval_backend faster (faster-coco-eval) gives the same 12 COCO stats as pycocotools.

"Same" allows 1e-12: the two may sum a mean in another order (last-bit differences seen on small sets).
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import CocoEvaluator

SIZE = 48  # image side in pixels


def _box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _generated_case(seed: int = 0, num_images: int = 24):
    """Ground truth (with a crowd box, an image without boxes) and per-image predictions with masks."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": f"{image_id}.png"})
        gt_boxes = []
        for _ in range(0 if image_id == 1 else int(rng.integers(1, 5))):
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - 12, 2))
            x1, y1 = x0 + int(rng.integers(4, 12)), y0 + int(rng.integers(4, 12))
            rle = mask_util.encode(np.asfortranarray(_box_mask(x0, y0, x1, y1)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "segmentation": rle,
                    "iscrowd": int(len(annotations) == 3),
                }
            )
            gt_boxes.append((x0, y0, x1, y1, annotations[-1]["category_id"]))
        if image_id == 2:
            continue  # an image without predictions
        boxes, labels = [], []
        for x0, y0, x1, y1, _ in gt_boxes:
            dx, dy = (int(v) for v in rng.integers(-2, 3, 2))
            boxes.append([max(x0 + dx, 0), y0, x1, min(y1 + dy, SIZE)])
        labels += [b[4] if rng.random() < 0.8 else int(rng.integers(1, 4)) for b in gt_boxes]
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - 10, 2))
            boxes.append([x0, y0, x0 + int(rng.integers(3, 10)), y0 + int(rng.integers(3, 10))])
            labels.append(int(rng.integers(1, 4)))
        boxes_t = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.stack([torch.from_numpy(_box_mask(*b)) for b in boxes_t.int().tolist()])[:, None]
        predictions[image_id] = {
            "scores": torch.from_numpy(rng.random(len(boxes))).float(),
            "labels": torch.tensor(labels),
            "boxes": boxes_t,
            "masks": masks,
        }
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, 4)]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    return coco_gt, predictions


def _evaluate(coco_gt: COCO, predictions: dict, backend: str) -> CocoEvaluator:
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"], backend=backend)
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize(verbose=False)
    return evaluator


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_backend_gives_identical_stats(seed):
    coco_gt, predictions = _generated_case(seed)
    reference = _evaluate(coco_gt, predictions, "pycocotools")
    faster = _evaluate(coco_gt, predictions, "faster")
    for iou_type in ("bbox", "segm"):
        ref_stats = reference.stats(iou_type)
        assert len(ref_stats) == 12 and 0 < ref_stats[0] < 1  # a non-trivial case
        assert faster.stats(iou_type) == pytest.approx(ref_stats, abs=1e-12, rel=0), iou_type

    # Independent oracle: plain pycocotools on the dumped results list.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(reference.results_json("bbox"))), "bbox")
        coco_eval.params.imgIds = sorted(predictions)  # the evaluator scores only the images it was given
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert faster.stats("bbox") == pytest.approx([float(x) for x in coco_eval.stats], abs=1e-12, rel=0)


def test_faster_backend_without_any_prediction_matches_pycocotools():
    coco_gt, _ = _generated_case(0, num_images=4)
    empty = {1: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}}
    evaluators = []
    for backend in ("pycocotools", "faster"):
        evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
        evaluator.update(empty)
        evaluator.accumulate()
        evaluator.summarize(verbose=False)
        evaluators.append(evaluator)
    assert evaluators[1].stats("bbox") == pytest.approx(evaluators[0].stats("bbox"), abs=1e-12, rel=0)


def test_faster_backend_prints_the_coco_table(capsys):
    """Issue 15: with --eval_backend faster only "IoU metric: bbox" was printed, not the 12 numbers."""
    coco_gt, predictions = _generated_case(0, num_images=4)
    for backend in ("pycocotools", "faster"):
        evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
        evaluator.update(predictions)
        evaluator.accumulate()
        evaluator.summarize(verbose=True)
        out = capsys.readouterr().out
        assert "IoU metric: bbox" in out and out.count("Average Precision") == 6, backend
        assert "Average Recall" in out and f"{evaluator.stats('bbox')[0]:0.3f}" in out, backend
