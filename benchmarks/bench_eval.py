"""COCO box evaluation time: pycocotools vs faster-coco-eval on one generated prediction set, in one run.

Generates (deterministically) a ground truth of N images (COCO-like box counts, sizes spanning the small /
medium / large ranges, ~1% crowd boxes) and D detections per image (jittered copies of the ground truth with
right and wrong classes, plus random boxes). Both backends score the same predictions; the 12 stats must be
identical up to float64 rounding of their means (1e-12; the script fails otherwise). Two levels are timed:

- library: ``loadRes`` + ``evaluate`` + ``accumulate`` + ``summarize`` of each package;
- project: ``datasets.coco_eval.CocoEvaluator(..., backend=...)``'s ``accumulate`` + ``summarize`` after the
  predictions were added with ``update`` (what ``--eval_backend`` selects).

Times are the process's CPU time (steady on a shared machine) and wall time.

    python benchmarks/bench_eval.py --images 5000 --dets 100
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time

import numpy as np
from speed_common import format_info, machine_info, markdown_table

from datasets.coco_eval import CocoEvaluator

NUM_CATEGORIES = 80
STATS_TOLERANCE = 1e-12


def make_ground_truth(num_images: int, seed: int = 0) -> dict:
    """A COCO instances dict: images ~640x480, ~7 boxes each (Poisson), areas log-uniform in 6^2..450^2 px."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(480, 641)), int(rng.integers(360, 481))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        for _ in range(int(rng.poisson(7))):
            side = float(np.exp(rng.uniform(np.log(6), np.log(450))))
            aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
            w, h = min(side * aspect, width - 1.0), min(side / aspect, height - 1.0)
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, NUM_CATEGORIES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_predictions(gt: dict, dets_per_image: int, seed: int = 1) -> list[dict]:
    """COCO results (image_id, category_id, bbox xywh, score): per ground-truth box a jittered copy with its
    class (higher scores) and one with a random class, then random boxes up to ``dets_per_image`` per image."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    results = []
    for image in gt["images"]:
        width, height = image["width"], image["height"]
        boxes, classes, scores = [], [], []
        for ann in by_image.get(image["id"], [])[: dets_per_image // 2]:
            x, y, w, h = ann["bbox"]
            for category, low in ((ann["category_id"], 0.3), (int(rng.integers(1, NUM_CATEGORIES + 1)), 0.0)):
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                boxes.append([x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)])
                classes.append(category)
                scores.append(rng.uniform(low, low + 0.7))
        while len(boxes) < dets_per_image:
            w, h = float(rng.uniform(4, width / 2)), float(rng.uniform(4, height / 2))
            boxes.append([float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h])
            classes.append(int(rng.integers(1, NUM_CATEGORIES + 1)))
            scores.append(rng.uniform(0.0, 0.5))
        for box, category, score in zip(boxes, classes, scores):
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    return results


def eval_pycocotools(gt: dict, results: list[dict]) -> list[float]:
    """The 12 bbox stats with pycocotools (loadRes, evaluate, accumulate, summarize)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(x) for x in coco_eval.stats[:12]]


def eval_faster(gt: dict, results: list[dict]) -> list[float]:
    """The 12 bbox stats with faster-coco-eval's COCOeval_faster (same steps)."""
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(x) for x in coco_eval.stats[:12]]


def eval_project(gt: dict, results: list[dict], backend: str) -> tuple[list[float], float, float]:
    """(12 stats, CPU s, wall s) of the project's CocoEvaluator ``accumulate`` + ``summarize`` (after ``update``)."""
    import torch
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
    per_image: dict[int, list[dict]] = {}
    for r in results:
        per_image.setdefault(r["image_id"], []).append(r)
    for image_id, dets in per_image.items():
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64)
        evaluator.update(
            {
                image_id: {
                    "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float64),
                    "labels": torch.tensor([d["category_id"] for d in dets]),
                    "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                }
            }
        )
    _, cpu, wall = _timed(_accumulate_and_summarize, evaluator)
    return evaluator.stats("bbox"), cpu, wall


def _accumulate_and_summarize(evaluator: CocoEvaluator) -> None:
    evaluator.accumulate()
    evaluator.summarize(verbose=False)


def _timed(fn, *args):
    """(result, process CPU seconds, wall seconds) of ``fn(*args)``."""
    tic, wall_tic = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - tic, time.perf_counter() - wall_tic


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=5000, type=int)
    parser.add_argument("--dets", default=100, type=int, help="detections per image")
    parser.add_argument("--skip_project", action="store_true", help="time only the two libraries")
    opts = parser.parse_args(argv)
    print(format_info(machine_info()), flush=True)

    gt = make_ground_truth(opts.images)
    results = make_predictions(gt, opts.dets)
    print(f"{len(gt['images'])} images, {len(gt['annotations'])} boxes, {len(results)} detections", flush=True)

    # Each library gets its own copy: loadRes adds fields to the result dicts.
    ref, cpu_ref, wall_ref = _timed(eval_pycocotools, copy.deepcopy(gt), copy.deepcopy(results))
    print(f"pycocotools: {cpu_ref:.1f} s CPU, {wall_ref:.1f} s wall", flush=True)
    fast, cpu_fast, wall_fast = _timed(eval_faster, copy.deepcopy(gt), copy.deepcopy(results))
    print(f"faster-coco-eval: {cpu_fast:.1f} s CPU, {wall_fast:.1f} s wall", flush=True)
    timings = [("library", cpu_ref, wall_ref, cpu_fast, wall_fast)]
    checks = [("library", ref, fast)]
    if not opts.skip_project:
        p_ref, cpu_pref, wall_pref = eval_project(gt, results, "pycocotools")
        print(f"project pycocotools: {cpu_pref:.1f} s CPU, {wall_pref:.1f} s wall", flush=True)
        p_fast, cpu_pfast, wall_pfast = eval_project(gt, results, "faster")
        print(f"project faster: {cpu_pfast:.1f} s CPU, {wall_pfast:.1f} s wall", flush=True)
        timings.append(("project", cpu_pref, wall_pref, cpu_pfast, wall_pfast))
        checks.append(("project", p_ref, p_fast))
    rows = []
    for level, cpu_a, wall_a, cpu_b, wall_b in timings:
        rows.append([level, "pycocotools", f"{cpu_a:.2f}", f"{wall_a:.2f}", "1.00", "1.00"])
        rows.append(
            [level, "faster", f"{cpu_b:.2f}", f"{wall_b:.2f}", f"{cpu_a / cpu_b:.2f}", f"{wall_a / wall_b:.2f}"]
        )
    header = ["level", "backend", "CPU s", "wall s", "speed-up (CPU)", "speed-up (wall)"]
    print(markdown_table(header, rows))
    print("stats (pycocotools):", ", ".join(f"{x:.6f}" for x in ref))
    for level, a, b in checks:
        diff = max(abs(x - y) for x, y in zip(a, b))
        print(f"{level}: 12 stats bitwise identical: {a == b} (max abs difference {diff:.3g})")
        # Summation order may differ in the last bit of a mean: allow float64 rounding, nothing more.
        if diff > STATS_TOLERANCE:
            raise SystemExit(f"error: {level} stats differ between backends: {a} vs {b}")
    return {"rows": rows, "stats": ref}


if __name__ == "__main__":
    main()
