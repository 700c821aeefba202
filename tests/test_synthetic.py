"""The generated dataset: deterministic bytes, valid COCO/panoptic content, atomic and concurrency-safe creation."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocotools import mask as mask_utils

from datasets import synthetic
from datasets.coco_io import coco_api_from_json, load_coco_json
from datasets.errors import DatasetError


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_generation_is_deterministic_and_complete(tmp_path):
    first = synthetic.generate_synthetic_dataset(tmp_path / "a", 6, 3)
    second = synthetic.generate_synthetic_dataset(tmp_path / "b", 6, 3)
    digest = _digest(first)
    assert digest == _digest(second)
    for split, size in (("train", 6), ("val", 3)):
        assert f"annotations/instances_{split}2017.json" in digest
        assert len(list((first / f"{split}2017").iterdir())) == size
        assert len(list((first / "annotations" / f"panoptic_{split}2017").iterdir())) == size
    suffixes = {p.suffix for p in (first / "train2017").iterdir()}
    assert suffixes == {".jpg", ".png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock", ".b.lock", "a", "b"]  # no temp folder left


def test_instances_and_panoptic_content(tmp_path):
    root = synthetic.generate_synthetic_dataset(tmp_path / "d", 8, 2)
    data = load_coco_json(root / "annotations" / "instances_train2017.json")  # validates required keys
    assert [c["id"] for c in data["categories"]] == [1, 3, 4, 7, 9, 12]
    coco = coco_api_from_json(data)
    for image in data["images"]:
        pixels = np.asarray(PIL.Image.open(root / "train2017" / image["file_name"]).convert("RGB"))
        assert pixels.shape == (image["height"], image["width"], 3)
        for annotation in coco.imgToAnns[image["id"]]:
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"] and w > 0 < h
            rle = coco.annToRLE(annotation)
            assert mask_utils.area(rle) == annotation["area"] > 0
            assert np.allclose(mask_utils.toBbox(rle), annotation["bbox"])

    panoptic = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    assert {c["id"]: c["isthing"] for c in panoptic["categories"]} == {
        1: 1,
        3: 1,
        4: 1,
        7: 1,
        9: 1,
        12: 1,
        14: 0,
        17: 0,
    }
    for entry in panoptic["annotations"]:
        rgb = np.asarray(PIL.Image.open(root / "annotations" / "panoptic_train2017" / entry["file_name"]), np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        segments = {s["id"]: s for s in entry["segments_info"]}
        assert set(np.unique(ids)) == set(segments)  # every pixel belongs to a listed segment
        for segment_id, segment in segments.items():
            ys, xs = np.nonzero(ids == segment_id)
            assert segment["area"] == len(xs)
            assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_sample_statistics_cover_the_required_cases():
    samples = [synthetic.render_sample(np.random.default_rng([7, i])) for i in range(150)]
    instances = [a for s in samples for a in s["instances"]]
    counts = [sum(1 for a in s["instances"] if not a["iscrowd"]) for s in samples]
    areas = np.array([a["area"] for a in instances if not a["iscrowd"]])
    assert any(c == 0 for c in counts) and max(counts) <= 6
    assert any(a["iscrowd"] for a in instances) and 0.3 < np.mean(counts) / 6 < 0.8
    assert (areas < 10**2).any() and (areas > 96**2).any()
    assert np.mean(areas >= 32**2) > 0.6  # mostly medium and large, so a small model can learn it
    sizes = {s["pixels"].shape[:2] for s in samples}
    assert len(sizes) > 20 and all(128 <= h <= 160 and 128 <= w <= 160 for h, w in sizes)
    overlaps = 0
    for sample in samples:
        boxes = np.array([a["bbox"] for a in sample["instances"]]).reshape(-1, 4)
        for i in range(len(boxes)):
            for j in range(i):
                ix = min(boxes[i, 0] + boxes[i, 2], boxes[j, 0] + boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
                iy = min(boxes[i, 1] + boxes[i, 3], boxes[j, 1] + boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
                overlaps += ix > 0 and iy > 0
    assert overlaps > 5  # some occlusion


def test_interrupted_generation_leaves_nothing_usable(tmp_path, monkeypatch):
    real_write = synthetic._write_split

    def write_then_die(root, split, size):
        real_write(root, split, size)
        if split == "val":
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic_dataset(tmp_path, 2, 1)
    assert [p.name for p in tmp_path.iterdir()] == [".synthetic-v1-train2-val1.lock"]
    monkeypatch.setattr(synthetic, "_write_split", real_write)
    # leftovers of a killed run (temp folder) are cleaned; the final folder only ever appears complete
    (tmp_path / ".synthetic-v1-train2-val1.tmp-dead").mkdir()
    root = synthetic.ensure_synthetic_dataset(tmp_path, 2, 1)
    assert (root / synthetic.MARKER).exists() and not list(tmp_path.glob("*.tmp-*"))


def test_existing_folder_without_marker_is_never_used(tmp_path):
    (tmp_path / "out" / "train2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a complete synthetic dataset"):
        synthetic.generate_synthetic_dataset(tmp_path / "out", 2, 1)
    (tmp_path / "empty").mkdir()
    assert (synthetic.generate_synthetic_dataset(tmp_path / "empty", 2, 1) / synthetic.MARKER).exists()
    with pytest.raises(DatasetError, match="must be >= 1"):
        synthetic.ensure_synthetic_dataset(tmp_path, 0, 1)


def _generate(root: str, queue) -> None:
    queue.put(str(synthetic.ensure_synthetic_dataset(root, 3, 2)))


def test_concurrent_processes_share_one_generation(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_generate, args=(str(tmp_path), queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert all(worker.exitcode == 0 for worker in workers)
    paths = {queue.get(timeout=5) for _ in workers}
    assert len(paths) == 1
    reference = synthetic.generate_synthetic_dataset(tmp_path / "reference", 3, 2)
    assert _digest(Path(paths.pop())) == _digest(reference)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_default_cache_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETR_CACHE", str(tmp_path / "cache"))
    root = synthetic.ensure_synthetic_dataset(train_size=2, val_size=1)
    assert root == tmp_path / "cache" / "synthetic-v1-train2-val1"
    out = synthetic.main(["--out", str(tmp_path / "cli"), "--train_size", "2", "--val_size", "1"])
    assert out == tmp_path / "cli" and str(out) in capsys.readouterr().out
    assert _digest(out) == _digest(root)
