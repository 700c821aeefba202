"""Reading COCO-format files: annotation JSON (validated, with clear errors) and images decoded to RGB.

Images are decoded by torchvision.io (libjpeg-turbo / libpng straight into a uint8 tensor, measured in
benchmarks/data.py) with PIL as the fallback for other formats. Grayscale, palette, CMYK, RGBA and 16-bit
images all come out as 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from datasets.errors import DatasetError

try:  # torchvision.io decoding is deprecated since 0.29 (TorchCodec supersedes it); PIL covers its absence
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_image = None

DECODERS = ("auto", "torchvision", "pil")
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def read_image_rgb(path: str | Path, decoder: str = "auto") -> Tensor | PIL.Image.Image:
    """Read and decode an image file to 8-bit RGB.

    Args:
        path: image file.
        decoder: 'auto' or 'torchvision' (torchvision.io, PIL for formats it cannot read) -> uint8 [3, H, W]
            tensor; 'pil' -> PIL RGB image (the published path).

    Raises:
        DatasetError: the file is missing, unreadable, corrupt or truncated (the message names the file).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found (check the image folder and 'file_name')") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read image file ({err.strerror or err})") from None
    if data.size == 0:
        raise DatasetError(f"{path}: image file is empty")
    if decoder != "pil" and decode_image is not None:
        image = _decode_torchvision(data, path)
        if image is not None:
            return image
    image = _decode_pil(data, path)
    return image if decoder == "pil" else F.pil_to_tensor(image)


def _decode_torchvision(data: np.ndarray, path: Path) -> Tensor | None:
    """uint8 [3, H, W], or None for a format torchvision cannot decode (the caller falls back to PIL)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        message = str(err)
        if "Unsupported image file" in message:
            return None
        reason = message.rsplit(", ", 1)[-1].strip()
        raise DatasetError(f"{path}: cannot decode image, corrupt or truncated ({reason})") from None
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_pil(data: np.ndarray, path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
            return pil_to_rgb(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot decode image, corrupt or truncated ({err})") from None


def pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> 8-bit RGB; 16/32-bit integer and float images are scaled from 16 bits, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Parse and validate a COCO instances file (cached per path and modification time).

    Checks the JSON syntax, the 'images' / 'annotations' / 'categories' lists, the required keys of each
    entry and that every bbox is four numbers and every category_id is declared. Missing optional fields are
    filled in: 'iscrowd' (0) and 'area' (bbox width x height), as pycocotools' evaluation reads both.

    Raises:
        DatasetError: naming the file and the first problem found.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise DatasetError(f"{path}: annotation file not found (check --coco_path or the *_ann_file flags)") from None
    return _load_coco_json_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_coco_json_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (UnicodeDecodeError, OSError) as err:
        raise DatasetError(f"{path}: cannot read annotation file ({err})") from None
    _validate(data, path)
    return data


def _validate(data: Any, path: str) -> None:
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list key '{key}' (a COCO instances file needs it)")
    for index, image in enumerate(data["images"]):
        _require_keys(image, _IMAGE_KEYS, f"{path}: images[{index}]")
        if not isinstance(image["id"], int):
            raise DatasetError(f"{path}: images[{index}] id must be an integer, got {image['id']!r}")
        if not all(isinstance(image[k], int) and image[k] > 0 for k in ("width", "height")):
            raise DatasetError(f"{path}: image id {image['id']} has invalid width/height (positive integers needed)")
    category_ids = set()
    for index, category in enumerate(data["categories"]):
        _require_keys(category, ("id",), f"{path}: categories[{index}]")
        if not isinstance(category["id"], int) or category["id"] < 0:
            raise DatasetError(f"{path}: categories[{index}] id must be a non-negative integer, got {category['id']!r}")
        category_ids.add(category["id"])
    for index, annotation in enumerate(data["annotations"]):
        _require_keys(annotation, _ANNOTATION_KEYS, f"{path}: annotations[{index}]")
        if not isinstance(annotation["image_id"], int):
            raise DatasetError(f"{path}: annotation id {annotation['id']} image_id must be an integer")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{path}: annotation id {annotation['id']} bbox must be 4 numbers [x, y, w, h]")
        if annotation["category_id"] not in category_ids:
            raise DatasetError(
                f"{path}: annotation id {annotation['id']} has category_id {annotation['category_id']!r}, "
                "which is not in 'categories'"
            )
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation and all(math.isfinite(v) for v in bbox):
            annotation["area"] = float(bbox[2]) * float(bbox[3])


def _require_keys(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where} must be a JSON object")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DatasetError(f"{where} lacks required key(s) {missing}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def invalid_box_annotations(data: dict[str, Any], negative: bool = True) -> list[dict[str, Any]]:
    """Annotations whose bbox has a NaN/infinite value (and, with ``negative``, a negative width or height)."""
    annotations = data["annotations"]
    if not annotations:
        return []
    boxes = np.asarray([a["bbox"] for a in annotations], dtype=np.float64)
    bad = ~np.isfinite(boxes).all(1)
    if negative:
        bad |= (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    return [annotations[i] for i in np.flatnonzero(bad)]


def negative_size_box_annotations(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Annotations whose (finite) bbox has a negative width or height: dropped from the targets as published."""
    annotations = data["annotations"]
    if not annotations:
        return []
    boxes = np.asarray([a["bbox"] for a in annotations], dtype=np.float64)
    bad = np.isfinite(boxes).all(1) & ((boxes[:, 2] < 0) | (boxes[:, 3] < 0))
    return [annotations[i] for i in np.flatnonzero(bad)]


def max_category_id(data: dict[str, Any], path: str | Path) -> int:
    """Largest category id declared in a loaded annotation file."""
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is empty; nothing to detect")
    return max(category["id"] for category in data["categories"])


def coco_api_from_json(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over already-loaded annotations (no second parse, no index printout)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
