"""Panoptic quality: hand-computed cases (void, crowd, IoU threshold), a brute-force oracle, and the evaluator."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from datasets.panoptic_eval import PanopticEvaluator, format_pq_table, read_panoptic_png
from datasets.panoptic_quality import id_to_rgb, merge_stats, pq_average, pq_image_stats, rgb_to_id

THING, STUFF, OTHER = 1, 100, 2
IS_THING = {THING: True, OTHER: True, STUFF: False, 7: True}  # category 7 never occurs


def seg(i, cat, crowd=0, area=None, arr=None):
    out = {"id": i, "category_id": cat, "iscrowd": crowd}
    if arr is not None:
        out["area"] = int((arr == i).sum())
    elif area is not None:
        out["area"] = area
    return out


def row(*ids):
    return np.array([ids], dtype=np.int64)


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256**3 - 1, 12345678]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[1, 1].tolist() == [0, 0, 1] and rgb[0, 3].tolist() == [0, 1, 0]
    assert (rgb_to_id(rgb) == ids).all()


def test_void_and_strict_iou_threshold():
    # gt: thing segment 1 (4 px), two void pixels, stuff segment 2 (4 px).
    gt = row(1, 1, 1, 1, 0, 0, 2, 2, 2, 2)
    # pred 5 covers gt 1 and the void pixels: IoU = 4 / (6 + 4 - 4 - 2) = 1.
    # preds 7 and 9 each cover half of gt 2: IoU = 2 / (2 + 4 - 2) = 0.5, not > 0.5 -> two FP, one FN.
    pred = row(5, 5, 5, 5, 5, 5, 7, 7, 9, 9)
    stats = pq_image_stats(
        gt, [seg(1, THING, arr=gt), seg(2, STUFF, arr=gt)], pred, [seg(5, THING), seg(7, STUFF), seg(9, STUFF)]
    )
    assert stats == {THING: [1.0, 1, 0, 0], STUFF: [0.0, 0, 2, 1]}
    res = pq_average(stats, IS_THING)
    assert res["All"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}
    assert res["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert res["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    assert res["per_class"][7] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_fractional_values():
    # gt 1 (thing, 6 px) / gt 2 (stuff, 4 px); pred 3 (thing) = 5 px on gt1; pred 4 (stuff) = 4 on gt2 + 1 on gt1.
    gt = row(1, 1, 1, 1, 1, 1, 2, 2, 2, 2)
    pred = row(3, 3, 3, 3, 3, 4, 4, 4, 4, 4)
    stats = pq_image_stats(gt, [seg(1, THING, arr=gt), seg(2, STUFF, arr=gt)], pred, [seg(3, THING), seg(4, STUFF)])
    assert stats[THING] == pytest.approx([5 / 6, 1, 0, 0])
    assert stats[STUFF] == pytest.approx([4 / 5, 1, 0, 0])
    # A second image where the thing is missed and a spurious thing of another class appears.
    gt2 = row(1, 1, 1, 1, 0, 0)
    pred2 = row(0, 0, 8, 8, 8, 8)
    stats2 = pq_image_stats(gt2, [seg(1, THING, arr=gt2)], pred2, [seg(8, OTHER)])
    # pred 8: 2 of 4 px on void = 0.5, not > 0.5 -> FP of OTHER; gt 1 -> FN.
    assert stats2 == {THING: [0.0, 0, 0, 1], OTHER: [0.0, 0, 1, 0]}
    total = merge_stats(merge_stats({}, stats), stats2)
    res = pq_average(total, IS_THING)
    pq_thing = (5 / 6) / (1 + 0.5)  # one TP, one FN
    assert res["per_class"][THING]["pq"] == pytest.approx(pq_thing)
    assert res["per_class"][THING]["sq"] == pytest.approx(5 / 6)
    assert res["per_class"][THING]["rq"] == pytest.approx(2 / 3)
    assert res["Things"]["pq"] == pytest.approx((pq_thing + 0.0) / 2) and res["Things"]["n"] == 2
    assert res["Stuff"]["pq"] == pytest.approx(0.8)
    assert res["All"]["pq"] == pytest.approx((pq_thing + 0.8) / 3)
    assert res["All"]["sq"] == pytest.approx((5 / 6 + 0.0 + 0.8) / 3)


def test_crowd_regions():
    # gt 3: crowd of THING (6 px); gt 1: THING (4 px).
    gt = row(3, 3, 3, 3, 3, 3, 1, 1, 1, 1)
    gts = [seg(3, THING, crowd=1, arr=gt), seg(1, THING, arr=gt)]
    # pred 4 (THING) lies on the crowd: never matched, ignored (4/4 on crowd).
    # pred 6 (THING) = 2 crowd px + the 4 px of gt 1: IoU = 4 / (6 + 4 - 4) = 2/3 -> TP (crowd is not void).
    pred = row(4, 4, 4, 4, 6, 6, 6, 6, 6, 6)
    stats = pq_image_stats(gt, gts, pred, [seg(4, THING), seg(6, THING)])
    assert stats == {THING: [pytest.approx(2 / 3), 1, 0, 0]}
    # The same pixels predicted as another class: the crowd of THING does not excuse OTHER -> FP; gt 1 -> FN.
    stats = pq_image_stats(gt, gts, pred, [seg(4, OTHER), seg(6, OTHER)])
    assert stats == {OTHER: [0.0, 0, 2, 0], THING: [0.0, 0, 0, 1]}
    # A crowd-only ground truth with no prediction counts nothing (no FN for crowds).
    assert pq_image_stats(gt, gts[:1], np.zeros_like(gt), []) == {}


def test_void_plus_crowd_majority_rule():
    # gt: 0 0 | crowd 3 (THING) x2 | gt 1 (THING) x6. pred 9 (THING) = 2 void + 2 crowd + 2 of gt1 + pred 5 rest.
    gt = row(0, 0, 3, 3, 1, 1, 1, 1, 1, 1)
    gts = [seg(3, THING, crowd=1, arr=gt), seg(1, THING, arr=gt)]
    pred = row(9, 9, 9, 9, 9, 9, 5, 5, 5, 5)
    # pred 9: 4 of 6 px on void + crowd > 0.5 -> ignored. pred 5: IoU with gt1 = 4 / (4 + 6 - 4) = 2/3 -> TP.
    stats = pq_image_stats(gt, gts, pred, [seg(9, THING), seg(5, THING)])
    assert stats == {THING: [pytest.approx(2 / 3), 1, 0, 0]}


def test_unlabelled_gt_ids_are_void_and_unknown_pred_ids_rejected():
    gt = row(1, 1, 1, 1, 8, 8)  # id 8 is not in the annotation -> void
    pred = row(2, 2, 2, 2, 2, 2)
    # IoU = 4 / (6 + 4 - 4 - 2) = 1.
    assert pq_image_stats(gt, [seg(1, THING, arr=gt)], pred, [seg(2, THING)]) == {THING: [1.0, 1, 0, 0]}
    with pytest.raises(ValueError, match="not in segments_info"):
        pq_image_stats(gt, [seg(1, THING, arr=gt)], pred, [])
    with pytest.raises(ValueError, match="absent from the PNG"):
        pq_image_stats(gt, [seg(1, THING, arr=gt)], pred, [seg(2, THING), seg(3, THING)])
    with pytest.raises(ValueError, match="original image size"):
        pq_image_stats(gt, [seg(1, THING, arr=gt)], pred[:, :3], [seg(2, THING)])


def test_no_category_occurs():
    res = pq_average({}, IS_THING)
    assert res["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def _brute_force(gt, gts, pred, preds):
    """Pixel-loop re-derivation of the PQ rules, independent of the vectorised implementation."""
    known = {s["id"] for s in gts}
    h, w = gt.shape
    void = [[gt[y, x] not in known or gt[y, x] == 0 for x in range(w)] for y in range(h)]
    out = {}

    def bump(c, k, v=1):
        out.setdefault(c, [0.0, 0, 0, 0])[k] += v

    matched_p = set()
    matched_g = set()
    for g in gts:
        if g["iscrowd"]:
            continue
        for p in preds:
            if p["category_id"] != g["category_id"]:
                continue
            inter = union = 0
            for y in range(h):
                for x in range(w):
                    in_g, in_p = gt[y, x] == g["id"], pred[y, x] == p["id"]
                    inter += in_g and in_p
                    union += (in_g or in_p) and not (in_p and not in_g and void[y][x])
            if union and inter / union > 0.5:
                bump(g["category_id"], 0, inter / union)
                bump(g["category_id"], 1)
                matched_g.add(g["id"])
                matched_p.add(p["id"])
    for g in gts:
        if g["id"] not in matched_g and not g["iscrowd"]:
            bump(g["category_id"], 3)
    crowd = {g["id"]: g["category_id"] for g in gts if g["iscrowd"]}
    for p in preds:
        if p["id"] in matched_p:
            continue
        area = int((pred == p["id"]).sum())
        ignored = sum(
            1
            for y in range(h)
            for x in range(w)
            if pred[y, x] == p["id"] and (void[y][x] or crowd.get(gt[y, x]) == p["category_id"])
        )
        if ignored / area <= 0.5:
            bump(p["category_id"], 2)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_random_images(seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 6, size=(3, 2))
    gt = np.repeat(np.repeat(blocks, 2, axis=0), 4, axis=1)  # 6 x 8, ids 0..5; id 5 is unlabelled
    gt = np.where(rng.random(gt.shape) < 0.15, rng.integers(0, 6, size=gt.shape), gt)
    gts = [seg(i, int(rng.integers(1, 3)), crowd=int(i == 4), arr=gt) for i in (1, 2, 3, 4)]
    gt_category = {s["id"]: s["category_id"] for s in gts}
    # predictions: the gt blocks relabelled (+10), with their own noise and some category flips
    pred = np.repeat(np.repeat(blocks + 10, 2, axis=0), 4, axis=1)
    pred = np.where(rng.random(pred.shape) < 0.25, rng.integers(10, 16, size=pred.shape), pred)
    preds = [seg(int(i), gt_category.get(int(i) - 10, 1) if rng.random() < 0.7 else 3) for i in np.unique(pred)]
    got = pq_image_stats(gt, gts, pred, preds)
    want = _brute_force(gt, gts, pred, preds)
    assert got.keys() == want.keys()
    for c in want:
        assert got[c] == pytest.approx(want[c])


def _png(ids: np.ndarray) -> bytes:
    with io.BytesIO() as f:
        Image.fromarray(id_to_rgb(ids)).save(f, format="PNG")
        return f.getvalue()


def test_evaluator_end_to_end(tmp_path):
    gt_folder = tmp_path / "panoptic_val2017"
    gt_folder.mkdir()
    gt_a = np.array([[1, 1, 1, 1, 0, 0, 2, 2, 2, 2]] * 2)
    gt_b = np.array([[5, 5, 5, 5, 5, 5, 5, 5, 5, 5]] * 2)
    (gt_folder / "a.png").write_bytes(_png(gt_a))
    (gt_folder / "b.png").write_bytes(_png(gt_b))
    ann = {
        "images": [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 10, "file_name": "a.png", "segments_info": [seg(1, THING, arr=gt_a), seg(2, STUFF, arr=gt_a)]},
            {"image_id": 11, "file_name": "b.png", "segments_info": [seg(5, STUFF, arr=gt_b)]},
        ],
        "categories": [{"id": THING, "isthing": 1}, {"id": STUFF, "isthing": 0}],
    }
    ann_file = tmp_path / "panoptic_val2017.json"
    ann_file.write_text(json.dumps(ann))
    out = tmp_path / "eval"
    evaluator = PanopticEvaluator(ann_file, gt_folder, output_dir=out)
    pred_a = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 3, 3]] * 2)  # thing IoU 1; stuff split in halves -> 2 FP + FN
    pred_b = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]] * 2)  # stuff IoU 18/20
    evaluator.update(
        [
            {
                "image_id": 10,
                "file_name": "000000000010.png",
                "png_string": _png(pred_a),
                "segments_info": [seg(1, THING), seg(2, STUFF), seg(3, STUFF)],
            },
            {"image_id": 11, "png_string": _png(pred_b), "segments_info": [{"id": 1, "category_id": STUFF}]},
        ]
    )
    evaluator.synchronize_between_processes()  # no process group: no-op
    res = evaluator.summarize()
    assert res["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    # STUFF: one TP (0.9), two FP, one FN -> PQ = 0.9 / (1 + 1 + 0.5), SQ 0.9, RQ 1 / 2.5
    assert res["Stuff"]["pq"] == pytest.approx(0.9 / 2.5)
    assert res["Stuff"]["sq"] == pytest.approx(0.9)
    assert res["Stuff"]["rq"] == pytest.approx(0.4)
    assert res["All"]["pq"] == pytest.approx((1 + 0.9 / 2.5) / 2)
    assert res["n_images"] == 2
    written = json.loads((out / "predictions.json").read_text())["annotations"]
    assert {p["file_name"] for p in written} == {"000000000010.png", "000000000011.png"}
    assert (read_panoptic_png(out / "000000000010.png") == pred_a).all()
    assert "PQ" in format_pq_table(res)


def test_evaluator_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="missing 'annotations'"):
        PanopticEvaluator(bad, tmp_path, output_dir=None)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"annotations": [], "categories": []}))
    evaluator = PanopticEvaluator(good, tmp_path, output_dir=None)
    with pytest.raises(ValueError, match="no panoptic annotation for predicted image_id 3"):
        evaluator.update([{"image_id": 3, "png_string": b"", "segments_info": []}])


def _write_two_image_gt(tmp_path):
    folder = tmp_path / "gt"
    folder.mkdir()
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    annotations = []
    for image_id in (1, 2):
        (folder / f"{image_id}.png").write_bytes(_png(gt))
        segments = [seg(1, THING, arr=gt), seg(2, STUFF, arr=gt)]
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": segments})
    ann = {"annotations": annotations, "categories": [{"id": THING, "isthing": 1}, {"id": STUFF, "isthing": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(ann))
    return tmp_path / "gt.json", folder


def _prediction(image_id):
    # image 1: both segments right; image 2: the thing is missed (predicted as stuff)
    ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    segments = [seg(1, THING), seg(2, STUFF)] if image_id == 1 else [seg(1, STUFF), seg(2, STUFF)]
    return {"image_id": image_id, "png_string": _png(ids), "segments_info": segments}


def _gather_worker(rank, init_file, ann_file, folder, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = PanopticEvaluator(ann_file, folder, output_dir=None)
        # rank 1 also sees image 1 again, as a padded DistributedSampler would give it
        evaluator.update([_prediction(1)] if rank == 0 else [_prediction(2), _prediction(1)])
        evaluator.synchronize_between_processes()
        result = evaluator.summarize()
        if rank == 0:
            out_file.write_text(json.dumps({"All": result["All"], "n_images": result["n_images"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_synchronize_between_two_processes(tmp_path):
    import torch.multiprocessing as mp

    ann_file, folder = _write_two_image_gt(tmp_path)
    single = PanopticEvaluator(ann_file, folder, output_dir=None)
    single.update([_prediction(1), _prediction(2)])
    want = single.summarize()
    out_file = tmp_path / "rank0.json"
    mp.spawn(_gather_worker, args=(tmp_path / "init", ann_file, folder, out_file), nprocs=2, join=True)
    got = json.loads(out_file.read_text())
    assert got["n_images"] == 2
    assert got["All"] == pytest.approx(want["All"])
    assert want["All"]["n"] == 2 and 0 < want["All"]["pq"] < 1
