"""COCO panoptic dataset: targets from hand-made PNGs, both folder layouts, errors, the synthetic split, PQ = 1."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from datasets import data_settings
from datasets.coco_panoptic import CocoPanoptic, panoptic_paths
from datasets.coco_panoptic import build as build_panoptic
from datasets.errors import DatasetError
from datasets.panoptic_eval import PanopticEvaluator
from datasets.panoptic_quality import id_to_rgb, read_panoptic_png


def build(image_set, args):
    return build_panoptic(image_set, data_settings(args))


CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 20, "name": "b", "isthing": 0}]


def write_dataset(root, layout="published", png_size=(10, 12)):
    """root/{val2017, annotations/panoptic_val2017.json, <layout> PNG folder}; one 10 x 12 image (h x w)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    png_dir = root / ("panoptic_val2017" if layout == "published" else "annotations/panoptic_val2017")
    png_dir.mkdir(parents=True)
    ids = np.full((10, 12), 7 * 256)  # stuff segment 1792 (needs the G channel)
    ids[2:5, 3:9] = 5  # thing: rows 2-4, cols 3-8
    ids[8:, :2] = 0  # void
    PIL.Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "val2017" / "000000000042.png")
    PIL.Image.fromarray(id_to_rgb(np.resize(ids, png_size))).save(png_dir / "000000000042.png")
    segments = [
        {"id": 5, "category_id": 1, "iscrowd": 0, "bbox": [3, 2, 6, 3], "area": 18},
        {"id": 1792, "category_id": 20, "iscrowd": 1, "bbox": [0, 0, 12, 10], "area": 98},
        {"id": 9, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1},  # not in the PNG
    ]
    data = {
        "images": [{"id": 42, "file_name": "000000000042.png", "height": 10, "width": 12}],
        "annotations": [{"image_id": 42, "file_name": "000000000042.png", "segments_info": segments}],
        "categories": CATEGORIES,
    }
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return ids


def args_for(tiny_args, *extra):
    return tiny_args("--masks", "--dataset_file", "coco_panoptic", *extra)


def test_targets_from_png(tmp_path):
    ids = write_dataset(tmp_path)
    ds = CocoPanoptic(
        tmp_path / "val2017", tmp_path / "panoptic_val2017", tmp_path / "annotations/panoptic_val2017.json"
    )
    assert len(ds) == 1 and ds.is_thing_map == {1: True, 20: False} and ds.get_height_and_width(0) == (10, 12)
    image, target = ds[0]
    assert target["labels"].tolist() == [1, 20]  # segment 9 (absent from the PNG) dropped
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, 10, 12)
    assert (target["masks"][0].numpy() == (ids == 5)).all() and (target["masks"][1].numpy() == (ids == 1792)).all()
    assert target["boxes"].tolist() == [[3, 2, 9, 5], [0, 0, 12, 10]]  # xywh -> xyxy
    assert target["iscrowd"].tolist() == [0, 1] and target["area"].tolist() == [18, 98]
    assert target["image_id"].tolist() == [42]
    assert target["orig_size"].tolist() == [10, 12] == target["size"].tolist()


def test_build_with_transforms_and_zip_layout(tmp_path, tiny_args):
    write_dataset(tmp_path, layout="zip")
    args = args_for(tiny_args, "--coco_path", str(tmp_path), "--input_scale", "0.05")
    assert panoptic_paths("val", data_settings(args))["ann_folder"] == tmp_path / "annotations" / "panoptic_val2017"
    ds = build("val", args)
    assert ds.coco is None  # no instances_val2017.json here
    image, target = ds[0]
    h, w = target["size"].tolist()
    assert image.shape == (3, h, w) and target["masks"].shape == (2, h, w) and h == 40  # short side 800 * 0.05
    boxes = target["boxes"]
    assert ((boxes >= 0) & (boxes <= 1)).all()
    # the thing's normalised cx, cy, w, h: x 3..9 of 12, y 2..5 of 10
    torch.testing.assert_close(boxes[0], torch.tensor([6 / 12, 3.5 / 10, 6 / 12, 3 / 10]))


def test_errors_name_the_file(tmp_path, tiny_args):
    with pytest.raises(DatasetError, match="does not exist"):
        build("val", args_for(tiny_args, "--coco_panoptic_path", str(tmp_path / "nowhere")))
    write_dataset(tmp_path, png_size=(10, 11))
    ds = build("val", args_for(tiny_args, "--coco_path", str(tmp_path)))
    with pytest.raises(DatasetError, match=r"000000000042.png: panoptic PNG is 11x10 but its image is 12x10"):
        ds[0]
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="missing or non-list key 'annotations'"):
        build("val", args_for(tiny_args, "--coco_path", str(tmp_path)))
    with pytest.raises(DatasetError, match="category id 20 >= num_classes 5"):
        write_dataset(tmp_path / "again")
        build("val", args_for(tiny_args, "--coco_path", str(tmp_path / "again"), "--num_classes", "5"))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from datasets.synthetic import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), train_size=3, val_size=4)


def test_synthetic_split_matches_its_pngs(synthetic_root, tiny_args):
    args = args_for(tiny_args, "--synthetic_dir", str(synthetic_root.parent))
    args.synthetic_train_size, args.synthetic_val_size = 3, 4
    ds = build("val", args)
    assert ds.ann_file == synthetic_root / "annotations" / "panoptic_val2017.json"
    assert ds.ann_folder == synthetic_root / "annotations" / "panoptic_val2017"
    assert ds.coco is not None and len(ds.coco.imgs) == 4  # instances_val2017.json for box/mask AP
    assert {c for c, thing in ds.is_thing_map.items() if not thing} == {14, 17}
    ds._transforms = None
    for index in range(len(ds)):
        _, target = ds[index]
        annotation = ds.annotations[index]
        ids = read_panoptic_png(ds.ann_folder / annotation["file_name"])
        union = target["masks"].sum(0)
        assert union.max() <= 1 and (union.numpy() == (ids != 0)).all()  # segments tile the labelled pixels
        assert target["masks"].flatten(1).sum(1).tolist() == target["area"].tolist()
        assert sorted(target["labels"].tolist()) == sorted(s["category_id"] for s in annotation["segments_info"])


def test_ground_truth_scores_pq_one(synthetic_root, tmp_path):
    ann_file = synthetic_root / "annotations" / "panoptic_val2017.json"
    folder = synthetic_root / "annotations" / "panoptic_val2017"
    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "eval")
    for annotation in json.loads(ann_file.read_text())["annotations"]:
        png = (folder / annotation["file_name"]).read_bytes()
        segments = [{"id": s["id"], "category_id": s["category_id"]} for s in annotation["segments_info"]]
        evaluator.update([{"image_id": annotation["image_id"], "png_string": png, "segments_info": segments}])
    result = evaluator.summarize()
    assert result["All"]["pq"] == pytest.approx(1.0) and result["Stuff"]["n"] == 2 and result["Things"]["n"] >= 1


@pytest.mark.slow
def test_two_stage_panoptic_training_logs_pq(synthetic_root, tmp_path):
    """Stage 1 trains the detector on the panoptic data, stage 2 the mask head on it frozen; PQ reaches log.txt."""
    from helpers import parse_tiny_args

    import main

    common = ["--dataset_file", "coco_panoptic", "--epochs", "1", "--batch_size", "2", "--input_scale", "0.15"]
    common += ["--synthetic_dir", str(synthetic_root.parent), "--synthetic_train_size", "3"]
    common += ["--synthetic_val_size", "4", "--no_progress"]
    main.main(parse_tiny_args(*common, "--output_dir", str(tmp_path / "detector")))
    detector = tmp_path / "detector" / "checkpoint.pth"
    frozen = torch.load(detector, map_location="cpu", weights_only=False)["model"]

    run = tmp_path / "panoptic"
    main.main(parse_tiny_args(*common, "--masks", "--frozen_weights", str(detector), "--output_dir", str(run)))
    last = json.loads((run / "log.txt").read_text().splitlines()[-1])
    for key in ("test_PQ_all", "test_PQ_th", "test_PQ_st"):
        assert set(last[key]) == {"pq", "sq", "rq", "n"} and 0 <= last[key]["pq"] <= 1
    assert last["test_PQ_st"]["n"] == 2  # both stuff classes occur in the ground truth
    assert len(last["test_coco_eval_masks"]) == 12 and "test_loss_dice" in last
    written = json.loads((run / "panoptic_eval" / "predictions.json").read_text())["annotations"]
    assert len(written) == 4
    state = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    assert {k for k in state if not k.startswith("detr.")} >= {
        "mask_head.lay1.weight",
        "bbox_attention.q_linear.weight",
    }
    for name, value in frozen.items():  # the detector did not move during stage 2
        torch.testing.assert_close(state[f"detr.{name}"], value)


def test_skip_bad_images_drops_and_counts_a_missing_png(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "panoptic_val2017" / "000000000042.png").unlink()
    paths = (tmp_path / "val2017", tmp_path / "panoptic_val2017", tmp_path / "annotations/panoptic_val2017.json")
    with pytest.raises(DatasetError, match="000000000042.png"):
        CocoPanoptic(*paths)[0]
    ds = CocoPanoptic(*paths, skip_bad_images=True)
    assert ds[0] is None and ds.skipped == 1
