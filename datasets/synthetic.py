"""A generated COCO-layout dataset, so ``python main.py`` runs anywhere with nothing to download.

Layout (the COCO one): ``train2017/``, ``val2017/`` (JPEG and PNG files), ``annotations/instances_{train,val}2017
.json`` (polygon segmentations, some crowd RLEs) and ``annotations/panoptic_{train,val}2017.json`` with PNG
folders ``annotations/panoptic_{train,val}2017/`` (segment id = R + 256 G + 256^2 B).

Content: six shape categories with non-contiguous ids (1, 3, 4, 7, 9, 12), each with its own colour tendency,
on a mildly textured background made of two "stuff" categories (ids 14, 17; panoptic only). 1-6 objects per
image from tiny to large (mostly medium and large), mild occlusions, some images without objects and some
crowd regions. Generation is deterministic (seeded per image: identical arguments give identical bytes) and
atomic: files are written into a temporary sibling folder that is renamed into place only when complete, under
a file lock, so concurrent processes (torchrun ranks) and interrupted runs never see a half dataset.

CLI: ``python -m datasets.synthetic --out DIR [--train_size N] [--val_size N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from pycocotools import mask as mask_utils

from datasets.errors import DatasetError

VERSION = 1
DEFAULT_TRAIN_SIZE = 2000
DEFAULT_VAL_SIZE = 200
MARKER = "SYNTHETIC_COMPLETE.json"
_SEED = 20200526
_SPLIT_CODES = {"train": 0, "val": 1}
_FIRST_IMAGE_ID = {"train": 1, "val": 1_000_001}

# (id, name, RGB colour tendency); ids deliberately non-contiguous.
THING_CATEGORIES = (
    (1, "rectangle", (215, 45, 45)),
    (3, "ellipse", (45, 185, 60)),
    (4, "triangle", (50, 85, 225)),
    (7, "cross", (235, 200, 35)),
    (9, "star", (195, 55, 210)),
    (12, "diamond", (35, 200, 215)),
)
STUFF_CATEGORIES = ((14, "wall", (150, 142, 128)), (17, "floor", (98, 102, 110)))

# Object side-length classes: (probability, low, high) in pixels; mostly medium and large.
_SIZE_CLASSES = ((0.03, 5, 9), (0.10, 10, 30), (0.62, 44, 90), (0.25, 91, 150))
_ELLIPSE = [(0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 28, endpoint=False)]
_STAR = [
    (0.5 + r * np.sin(t), 0.5 - r * np.cos(t))
    for k, t in enumerate(np.linspace(0, 2 * np.pi, 10, endpoint=False))
    for r in [0.5 if k % 2 == 0 else 0.21]
]
_SHAPES = {
    "rectangle": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "ellipse": _ELLIPSE,
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "cross": [
        (0.32, 0),
        (0.68, 0),
        (0.68, 0.32),
        (1, 0.32),
        (1, 0.68),
        (0.68, 0.68),
        (0.68, 1),
        (0.32, 1),
        (0.32, 0.68),
        (0, 0.68),
        (0, 0.32),
        (0.32, 0.32),
    ],  # fmt: skip
    "star": _STAR,
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
}


def default_cache_dir() -> Path:
    """$DETR_CACHE, else ~/.cache/detr."""
    return Path(os.environ.get("DETR_CACHE") or Path.home() / ".cache" / "detr").expanduser()


def ensure_synthetic_dataset(
    root: str | Path | None = None, train_size: int | None = None, val_size: int | None = None
) -> Path:
    """Generate the synthetic dataset once (atomically, deterministically) and return its COCO-layout root.

    Args:
        root: cache folder (default :func:`default_cache_dir`); the dataset is its subfolder
            ``synthetic-v{VERSION}-train{N}-val{M}``.
        train_size: training images (default 2000).
        val_size: validation images (default 200).
    """
    train_size = DEFAULT_TRAIN_SIZE if train_size is None else int(train_size)
    val_size = DEFAULT_VAL_SIZE if val_size is None else int(val_size)
    base = default_cache_dir() if root is None else Path(root).expanduser()
    return generate_synthetic_dataset(
        base / f"synthetic-v{VERSION}-train{train_size}-val{val_size}", train_size, val_size
    )


def generate_synthetic_dataset(out_dir: str | Path, train_size: int, val_size: int) -> Path:
    """Write the dataset exactly into ``out_dir`` unless it is already there; returns ``out_dir``.

    Raises:
        DatasetError: bad sizes, or ``out_dir`` exists with other content.
    """
    if train_size < 1 or val_size < 1:
        raise DatasetError(f"synthetic dataset sizes must be >= 1, got train {train_size}, val {val_size}")
    out = Path(out_dir).expanduser().absolute()
    expected = {"version": VERSION, "train_size": train_size, "val_size": val_size}
    if _is_complete(out, expected):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out.parent / f".{out.name}.lock") as locked:
        if _is_complete(out, expected):  # another process finished it while we waited
            return out
        if out.exists():
            if any(out.iterdir()):
                raise DatasetError(
                    f"{out}: exists but is not a complete synthetic dataset of these sizes; delete it or choose another"
                )
            out.rmdir()
        if locked:  # only a lock holder can tell leftovers of killed runs from a concurrent generation
            for stale in out.parent.glob(f".{out.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            for split, size in (("train", train_size), ("val", val_size)):
                _write_split(tmp, split, size)
            (tmp / MARKER).write_text(json.dumps(expected))
            try:
                os.rename(tmp, out)
            except OSError:
                if not _is_complete(out, expected):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a lock-less concurrent run won the rename
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _is_complete(out: Path, expected: dict[str, int]) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path``; yields False where file locks are unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield False
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # file system without flock support
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_split(root: Path, split: str, size: int) -> None:
    image_dir = root / f"{split}2017"
    panoptic_dir = root / "annotations" / f"panoptic_{split}2017"
    image_dir.mkdir(parents=True)
    panoptic_dir.mkdir(parents=True)
    images, annotations, panoptic_annotations = [], [], []
    for index in range(size):
        image_id = _FIRST_IMAGE_ID[split] + 3 * index  # non-contiguous ids catch index/id mix-ups
        rng = np.random.default_rng([_SEED, _SPLIT_CODES[split], index])
        sample = render_sample(rng)
        height, width = sample["pixels"].shape[:2]
        file_name = f"{image_id:012d}.{'png' if index % 4 == 3 else 'jpg'}"
        image = PIL.Image.fromarray(sample["pixels"])
        if file_name.endswith(".png"):
            image.save(image_dir / file_name, compress_level=1)
        else:
            image.save(image_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for annotation in sample["instances"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
        png_name = f"{image_id:012d}.png"
        PIL.Image.fromarray(_encode_ids(sample["segment_ids"])).save(panoptic_dir / png_name, compress_level=1)
        panoptic_annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": sample["segments"]})

    info = {"description": f"DETR synthetic shapes v{VERSION}", "version": str(VERSION)}
    things = [{"id": i, "name": n, "supercategory": "shape"} for i, n, _ in THING_CATEGORIES]
    instances = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": things}
    categories = [{**c, "isthing": 1, "color": list(THING_CATEGORIES[k][2])} for k, c in enumerate(things)]
    categories += [
        {"id": i, "name": n, "supercategory": "stuff", "isthing": 0, "color": list(c)} for i, n, c in STUFF_CATEGORIES
    ]
    panoptic = {"info": info, "licenses": [], "images": images, "annotations": panoptic_annotations}
    panoptic["categories"] = categories
    _write_json(root / "annotations" / f"instances_{split}2017.json", instances)
    _write_json(root / "annotations" / f"panoptic_{split}2017.json", panoptic)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(obj, file, separators=(",", ":"))


def _encode_ids(segment_ids: np.ndarray) -> np.ndarray:
    """[H, W] int ids -> [H, W, 3] uint8 with id = R + 256 G + 256^2 B (the COCO panoptic PNG encoding)."""
    return np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], axis=-1).astype(np.uint8)


def _sample_side(rng: np.random.Generator, limit: int) -> int:
    probabilities = [p for p, _, _ in _SIZE_CLASSES]
    _, low, high = _SIZE_CLASSES[rng.choice(len(_SIZE_CLASSES), p=probabilities)]
    return int(rng.integers(low, min(high, limit) + 1))


def _place(rng: np.random.Generator, w: int, h: int, width: int, height: int, taken: list, max_overlap: float):
    """Top-left corner of a w x h box inside the image that covers at most ``max_overlap`` of any taken box."""
    for _ in range(25):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        ok = True
        for tx, ty, tw, th in taken:
            inter = max(0, min(x + w, tx + tw) - max(x, tx)) * max(0, min(y + h, ty + th) - max(y, ty))
            if inter > max_overlap * tw * th or inter > 0.5 * w * h:
                ok = False
                break
        if ok:
            return x, y
    return None


def _polygon(shape: str, x: float, y: float, w: float, h: float, flip: bool) -> list[float]:
    points = []
    for u, v in _SHAPES[shape]:
        points += [round(x + u * w, 2), round(y + ((1 - v) if flip else v) * h, 2)]
    return points


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Two stuff regions split by a sloped horizon, with low-frequency and fine noise: (pixels float32 [H, W, 3],
    stuff index [H, W] in {0, 1})."""
    horizon = height * rng.uniform(0.35, 0.7) + np.arange(width) * rng.uniform(-0.15, 0.15) * height / width
    stuff = (np.arange(height)[:, None] > horizon[None, :]).astype(np.int64)
    colours = np.array([c for _, _, c in STUFF_CATEGORIES], dtype=np.float32) + rng.uniform(-18, 18, (2, 3))
    coarse = PIL.Image.fromarray(rng.uniform(0, 255, (6, 6)).astype(np.uint8)).resize(
        (width, height), PIL.Image.BILINEAR
    )
    shade = (np.asarray(coarse, dtype=np.float32) - 127.5) * 0.09 + rng.normal(0, 4.0, (height, width))
    pixels = colours.astype(np.float32)[stuff] + shade.astype(np.float32)[..., None]
    return pixels, stuff


def _mask_of(rle: dict) -> np.ndarray:
    return mask_utils.decode(rle).astype(bool)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major run lengths starting with zeros), as in crowd annotations."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def render_sample(rng: np.random.Generator) -> dict[str, Any]:
    """One image: {'pixels' uint8 [H, W, 3], 'instances' (COCO annotations without id/image_id),
    'segment_ids' int [H, W] panoptic ids, 'segments' (panoptic segments_info)}."""
    width, height = int(rng.integers(128, 161)), int(rng.integers(128, 161))
    pixels, stuff = _background(rng, height, width)
    labels = stuff.copy()  # 0, 1: stuff; 2 + k: object k
    objects: list[dict[str, Any]] = []
    taken: list[tuple[int, int, int, int]] = []

    if rng.uniform() < 0.05:  # a crowd: a cluster of tiny shapes of one category, annotated as one region
        category = int(rng.integers(len(THING_CATEGORIES)))
        cw, ch = int(rng.integers(26, 44)), int(rng.integers(20, 36))
        corner = _place(rng, cw, ch, width, height, taken, 0.0)
        if corner is not None:
            taken.append((*corner, cw, ch))
            parts = []
            for _ in range(int(rng.integers(4, 9))):
                side = int(rng.integers(5, 10))
                px, py = corner[0] + rng.uniform(0, cw - side), corner[1] + rng.uniform(0, ch - side)
                shape = THING_CATEGORIES[category][1]
                parts.append(_polygon(shape, px, py, side, side, False))
            union = _mask_of(mask_utils.merge(mask_utils.frPyObjects(parts, height, width)))
            objects.append({"category": category, "mask": union, "crowd": True})

    count = 0 if rng.uniform() < 0.06 else int(rng.integers(1, 7))
    for _ in range(count):
        category = int(rng.integers(len(THING_CATEGORIES)))
        side = _sample_side(rng, min(width, height) - 2)
        aspect = float(np.exp(rng.uniform(-0.35, 0.35)))
        w = int(np.clip(round(side * aspect), 5, width - 2))
        h = int(np.clip(round(side / aspect), 5, height - 2))
        corner = _place(rng, w, h, width, height, taken, 0.3)
        if corner is None:
            continue
        taken.append((*corner, w, h))
        polygon = _polygon(THING_CATEGORIES[category][1], corner[0], corner[1], w, h, bool(rng.uniform() < 0.5))
        rle = mask_utils.frPyObjects([polygon], height, width)[0]
        objects.append({"category": category, "mask": _mask_of(rle), "polygon": polygon, "rle": rle, "crowd": False})

    instances = []
    for k, obj in enumerate(objects):
        colour = np.array(THING_CATEGORIES[obj["category"]][2]) + rng.uniform(-28, 28, 3)
        pixels[obj["mask"]] = colour
        labels[obj["mask"]] = 2 + k
        category_id = THING_CATEGORIES[obj["category"]][0]
        if obj["crowd"]:
            rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
            segmentation = _uncompressed_rle(obj["mask"])
        else:
            rle, segmentation = obj["rle"], [obj["polygon"]]
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        area = float(mask_utils.area(rle))
        instances.append(
            {
                "category_id": category_id,
                "bbox": bbox,
                "area": area,
                "iscrowd": int(obj["crowd"]),
                "segmentation": segmentation,
            }
        )
    pixels += rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    segment_ids, segments = _panoptic(labels, objects)
    return {"pixels": pixels, "instances": instances, "segment_ids": segment_ids, "segments": segments}


def _panoptic(labels: np.ndarray, objects: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Visible regions as panoptic segments: [H, W] ids and segments_info (category, area, bbox, iscrowd)."""
    segment_ids = np.zeros(labels.shape, dtype=np.int64)
    segments = []
    # (category id, iscrowd, segment id) per label value: stuff 0, 1, then object k at 2 + k.
    regions = [(category_id, 0, category_id * 1000) for category_id, _, _ in STUFF_CATEGORIES]
    regions += [
        (THING_CATEGORIES[o["category"]][0], int(o["crowd"]), THING_CATEGORIES[o["category"]][0] * 1000 + k + 1)
        for k, o in enumerate(objects)
    ]
    for label, (category_id, crowd, segment_id) in enumerate(regions):
        visible = labels == label
        area = int(visible.sum())
        if area == 0:
            continue
        segment_ids[visible] = segment_id
        ys, xs = np.nonzero(visible)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        segments.append({"id": segment_id, "category_id": category_id, "area": area, "bbox": bbox, "iscrowd": crowd})
    return segment_ids, segments


def main(argv: list[str] | None = None) -> Path:
    """CLI: generate the dataset into --out (or the default cache) and print its path and the time taken."""
    parser = argparse.ArgumentParser(description="Generate the synthetic COCO-layout dataset")
    parser.add_argument("--out", default=None, help="dataset folder (default: a subfolder of $DETR_CACHE)")
    parser.add_argument("--train_size", type=int, default=DEFAULT_TRAIN_SIZE)
    parser.add_argument("--val_size", type=int, default=DEFAULT_VAL_SIZE)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.out is None:
            path = ensure_synthetic_dataset(None, args.train_size, args.val_size)
        else:
            path = generate_synthetic_dataset(args.out, args.train_size, args.val_size)
    except DatasetError as err:  # e.g. --out naming a folder with other content: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    print(f"{path} ({time.perf_counter() - start:.1f} s)")
    return path


if __name__ == "__main__":
    main()
