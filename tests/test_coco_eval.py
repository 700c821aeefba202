"""CocoEvaluator: its numbers equal pycocotools run directly on the dumped predictions."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import CocoEvaluator, format_per_category_table, per_category_ap

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "disc"}, {"id": 7, "name": "never_annotated"}]


def _make_gt(rng: np.random.Generator, n_images: int = 6, size: int = 64) -> COCO:
    images, anns = [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.png"})
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, size / 2, 2)
            w, h = rng.uniform(4, size / 2, 2)
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([1, 3])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [poly],
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _predictions(coco: COCO, rng: np.random.Generator, skip_image: int | None = None) -> dict[int, dict]:
    """Jittered ground truth plus random false positives; ``skip_image`` gets no detections at all."""
    preds = {}
    for image_id in coco.getImgIds():
        if image_id == skip_image:
            preds[image_id] = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                               "boxes": torch.zeros(0, 4)}  # fmt: skip
            continue
        boxes, labels = [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = np.asarray(ann["bbox"]) + rng.normal(0, 1.5, 4)
            boxes.append([x, y, x + abs(w), y + abs(h)])
            labels.append(ann["category_id"] if rng.random() > 0.2 else 3)
        for _ in range(3):
            x, y = rng.uniform(0, 40, 2)
            boxes.append([x, y, x + rng.uniform(2, 20), y + rng.uniform(2, 20)])
            labels.append(int(rng.choice([1, 3])))
        preds[image_id] = {
            "scores": torch.tensor(rng.uniform(0.05, 1.0, len(boxes)), dtype=torch.float32),
            "labels": torch.tensor(labels),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
        }
    return preds


def _direct_stats(coco: COCO, json_path, iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco.loadRes(str(json_path))
        coco_eval = COCOeval(coco, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def _run(evaluator: CocoEvaluator, preds: dict) -> CocoEvaluator:
    for image_id, pred in preds.items():  # one image per update, as the evaluation loop does per batch
        evaluator.update({image_id: pred})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize(verbose=False)
    return evaluator


def test_bbox_stats_equal_pycocotools_on_dumped_json(tmp_path):
    rng = np.random.default_rng(0)
    coco = _make_gt(rng)
    evaluator = _run(CocoEvaluator(coco, ["bbox"]), _predictions(coco, rng, skip_image=2))
    path = evaluator.dump_results(tmp_path / "bbox.json", "bbox")
    direct = _direct_stats(coco, path, "bbox")
    assert np.array_equal(np.asarray(evaluator.coco_eval["bbox"].stats), direct)
    assert evaluator.stats("bbox") == [float(x) for x in direct]
    assert 0.05 < direct[0] < 0.95  # a non-trivial score, so equality means something
    assert not any(r["image_id"] == 2 for r in evaluator.results_json("bbox"))


def test_segm_stats_equal_pycocotools_on_dumped_json(tmp_path):
    rng = np.random.default_rng(1)
    coco = _make_gt(rng, n_images=4)
    preds = _predictions(coco, rng)
    for pred in preds.values():
        masks = torch.zeros(len(pred["boxes"]), 1, 64, 64, dtype=torch.uint8)
        for mask, box in zip(masks, pred["boxes"].round().int().clamp(0, 64).tolist()):
            mask[0, box[1] : box[3], box[0] : box[2]] = 1
        pred["masks"] = masks
    evaluator = _run(CocoEvaluator(coco, ["segm", "bbox"]), preds)
    path = evaluator.dump_results(tmp_path / "segm.json", "segm")
    direct = _direct_stats(coco, path, "segm")
    assert np.array_equal(np.asarray(evaluator.coco_eval["segm"].stats), direct)
    assert direct[0] > 0.05
    first = evaluator.results_json("segm")[0]
    assert mask_util.area(first["segmentation"]) > 0


def test_no_predictions_at_all_scores_zero():
    coco = _make_gt(np.random.default_rng(2), n_images=3)
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator = _run(CocoEvaluator(coco, ["bbox"]), {i: empty for i in coco.getImgIds()})
    assert evaluator.results_json("bbox") == []
    stats = evaluator.stats("bbox")
    assert stats[0] == 0.0 and stats[8] == 0.0  # ground truth exists, nothing found


def test_duplicate_updates_of_one_image_do_not_duplicate_detections():
    rng = np.random.default_rng(3)
    coco = _make_gt(rng, n_images=3)
    preds = _predictions(coco, rng)
    once = _run(CocoEvaluator(coco, ["bbox"]), preds)
    twice = CocoEvaluator(coco, ["bbox"])
    twice.update(preds)  # e.g. a DistributedSampler padding the last batch with repeated images
    twice = _run(twice, preds)
    assert twice.results_json("bbox") == once.results_json("bbox")
    assert twice.stats() == once.stats()


def test_per_category_ap_table():
    rng = np.random.default_rng(4)
    coco = _make_gt(rng, n_images=4)
    preds = {}
    for image_id in coco.getImgIds():  # perfect boxes for 'square', nothing for 'disc'
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if a["category_id"] == 1]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        preds[image_id] = {"scores": torch.ones(len(anns)), "labels": torch.ones(len(anns), dtype=torch.int64),
                           "boxes": boxes.float()}  # fmt: skip
    evaluator = _run(CocoEvaluator(coco, ["bbox"]), preds)
    rows = {name: ap for _, name, ap in per_category_ap(evaluator.coco_eval["bbox"])}
    assert rows["square"] == pytest.approx(1.0)
    assert rows["disc"] == 0.0
    assert math.isnan(rows["never_annotated"])
    table = format_per_category_table(per_category_ap(evaluator.coco_eval["bbox"]))
    assert "square" in table and "1.000" in table and "never_annotated" in table


def test_faster_backend_matches_pycocotools():
    rng = np.random.default_rng(5)
    coco = _make_gt(rng, n_images=8)
    preds = _predictions(coco, rng, skip_image=3)
    ref = _run(CocoEvaluator(coco, ["bbox"], backend="pycocotools"), preds)
    fast = _run(CocoEvaluator(coco, ["bbox"], backend="faster"), preds)
    assert np.allclose(fast.stats(), ref.stats(), atol=1e-12)


def test_unknown_backend_and_iou_type_are_errors():
    coco = _make_gt(np.random.default_rng(6), n_images=1)
    with pytest.raises(ValueError, match="eval backend"):
        CocoEvaluator(coco, ["bbox"], backend="nope")
    with pytest.raises(ValueError, match="keypoints"):
        CocoEvaluator(coco, ["keypoints"])
