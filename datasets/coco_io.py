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
import sys
import warnings
from collections.abc import Callable
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

    Checks the JSON syntax, the 'images' / 'annotations' / 'categories' lists and the type of every field the
    loaders and pycocotools read (see ``_validate_instances``). Missing optional fields are filled in:
    'iscrowd' (0) and 'area' (bbox width x height), as pycocotools' evaluation reads both.

    Raises:
        DatasetError: naming the file, the entry and the field of the first problem found.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise DatasetError(f"{path}: annotation file not found (check --coco_path or the *_ann_file flags)") from None
    return _load_coco_json_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_coco_json_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    data = _read_json(path, "annotation file", "check --coco_path or the *_ann_file flags")
    _validate_instances(data, path)
    return data


def load_coco_panoptic_json(path: str | Path) -> dict[str, Any]:
    """Parse and validate a COCO panoptic file (``panoptic_{split}2017.json``).

    Checks the 'images' and 'categories' entries as for instances files (plus an optional 0/1 'isthing') and
    every annotation's 'image_id', PNG 'file_name' and 'segments_info' (segment 'id' < 2^24, declared
    'category_id', optional 'bbox', 'area', 'iscrowd').

    Raises:
        DatasetError: naming the file, the entry and the field of the first problem found.
    """
    data = _read_json(str(path), "panoptic annotation file", "check --coco_panoptic_path")
    _require_lists(data, path, "a COCO panoptic annotation file")
    _validate_images(data["images"], path)
    category_ids = _validate_categories(data["categories"], path, panoptic=True)
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        _require_keys(annotation, ("image_id", "file_name", "segments_info"), where)
        _check_field(annotation, "image_id", _is_int64, "an integer (64-bit)", where)
        _check_field(annotation, "file_name", _is_file_name, "a non-empty file name", where)
        _check_field(annotation, "segments_info", lambda v: isinstance(v, list), "a list", where)
        for k, segment in enumerate(annotation["segments_info"]):
            inner = f"{where} segments_info[{k}]"
            _require_keys(segment, ("id", "category_id"), inner)
            _check_field(segment, "id", lambda v: _is_int(v) and 0 <= v < 2**24, "an integer in [0, 2^24)", inner)
            _check_category(segment, category_ids, inner)
            _check_optional_fields(segment, inner)
            if not all(math.isfinite(v) for v in segment.get("bbox", ())):
                raise DatasetError(f"{inner} bbox must be finite, got {segment['bbox']}")
    return data


def _read_json(path: str, what: str, hint: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found ({hint})") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (UnicodeDecodeError, OSError, RecursionError) as err:
        raise DatasetError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from None


def _validate_instances(data: Any, path: str) -> None:
    """Check every field the loaders read, with the types the published code accepts."""
    _require_lists(data, path, "a COCO instances file")
    _validate_images(data["images"], path)
    category_ids = _validate_categories(data["categories"], path, panoptic=False)
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        _require_keys(annotation, _ANNOTATION_KEYS, where)
        # pycocotools keys its annotation index by id, so it must be hashable and comparable.
        _check_field(annotation, "id", lambda v: _is_int64(v) or isinstance(v, str), "an int or string", where)
        _check_field(annotation, "image_id", _is_int64, "an integer (64-bit)", where)
        _check_category(annotation, category_ids, where)
        _check_optional_fields(annotation, where)
        segmentation = annotation.get("segmentation")
        if segmentation is not None and not _is_segmentation(segmentation):  # null: none (detection-only files)
            raise DatasetError(
                f"{where} segmentation must be a list of polygons (lists of numbers) or an RLE object with "
                f"'counts' and 'size', got {_describe(segmentation)}"
            )
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation and all(math.isfinite(v) for v in annotation["bbox"]):
            annotation["area"] = float(annotation["bbox"][2]) * float(annotation["bbox"][3])


def _require_lists(data: Any, path: str | Path, kind: str) -> None:
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories' ({kind})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list key '{key}' ({kind} needs it)")


def _validate_images(images: list[Any], path: str | Path) -> None:
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        _require_keys(image, _IMAGE_KEYS, where)
        _check_field(image, "id", _is_int64, "an integer (64-bit)", where)
        _check_field(image, "file_name", _is_file_name, "a non-empty file name", where)
        for key in ("width", "height"):
            if not (_is_int(image[key]) and 0 < image[key] < 2**31):
                raise DatasetError(
                    f"{where} has invalid width/height (positive integers needed), got {key} {_describe(image[key])}"
                )


def _validate_categories(categories: list[Any], path: str | Path, panoptic: bool) -> set[int]:
    category_ids = set()
    for index, category in enumerate(categories):
        where = f"{path}: categories[{index}]"
        _require_keys(category, ("id",), where)
        _check_field(category, "id", lambda v: _is_int64(v) and v >= 0, "a non-negative integer", where)
        if "name" in category:
            _check_field(category, "name", lambda v: isinstance(v, str), "a string", where)
        if panoptic and "isthing" in category:
            _check_field(category, "isthing", lambda v: _is_int(v) and v in (0, 1), "0 or 1", where)
        category_ids.add(category["id"])
    return category_ids


def _check_category(entry: dict[str, Any], category_ids: set[int], where: str) -> None:
    _check_field(entry, "category_id", _is_int64, "an integer (64-bit)", where)
    if entry["category_id"] not in category_ids:
        raise DatasetError(f"{where} has category_id {entry['category_id']}, which is not in 'categories'")


def _check_optional_fields(entry: dict[str, Any], where: str) -> None:
    """'bbox' (required for instances, optional for panoptic segments), 'area' and 'iscrowd' when present."""
    bbox = entry.get("bbox", [0, 0, 0, 0])
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DatasetError(f"{where} bbox must be 4 numbers [x, y, w, h], got {_describe(bbox)}")
    if "area" in entry:
        area = entry["area"]
        if not (_is_number(area) and math.isfinite(area) and area >= 0):
            raise DatasetError(f"{where} area must be a finite non-negative number, got {_describe(area)}")
    if "iscrowd" in entry:
        _check_field(entry, "iscrowd", lambda v: _is_int(v) and v in (0, 1), "0 or 1", where)


def _check_field(entry: dict[str, Any], key: str, accept: Callable[[Any], bool], what: str, where: str) -> None:
    if not accept(entry[key]):
        raise DatasetError(f"{where} {key} must be {what}, got {_describe(entry[key])}")


def _require_keys(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where} must be a JSON object, got {_describe(entry)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DatasetError(f"{where} lacks required key(s) {missing}")


def _describe(value: Any) -> str:
    """A JSON value in a few characters for a one-line message: containers by type, scalars by value."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return "list" if isinstance(value, list) else "object"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int64(value: Any) -> bool:
    """An integer that fits the int64 target tensors (image_id, labels)."""
    return _is_int(value) and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    """An int or float (NaN/inf included: the box checks report those) that converts to a float64."""
    return isinstance(value, float) or (_is_int(value) and abs(value) <= sys.float_info.max)


def _is_file_name(value: Any) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def _is_segmentation(value: Any) -> bool:
    """The shape pycocotools expects: polygons as a list of lists, or an RLE object (checked fully per sample)."""
    if isinstance(value, list):
        return all(isinstance(polygon, list) for polygon in value)
    return (
        isinstance(value, dict) and isinstance(value.get("counts"), (str, list)) and isinstance(value.get("size"), list)
    )


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """What makes an annotation's segmentation unusable as a [height, width] mask, or None when it is usable.

    Run per sample before pycocotools rasterises it (the loader only checks its shape): polygon coordinates
    must be finite and within the image grown by its own size on every side (far points make pycocotools'
    rasteriser overflow or allocate without bound); an RLE's 'size' must be [height, width] and its run
    lengths must add up to height x width (pycocotools leaves the rest of the mask uninitialised).
    """
    if isinstance(segmentation, list):
        for k, polygon in enumerate(segmentation):
            if not all(_is_number(v) and math.isfinite(v) for v in polygon):
                return f"segmentation polygon {k} must hold finite numbers"
            xs, ys = polygon[0::2], polygon[1::2]
            if xs and not (-width <= min(xs) and max(xs) <= 2 * width and -height <= min(ys) <= max(ys) <= 2 * height):
                return (
                    f"segmentation polygon {k} has a point farther outside the {width}x{height} image than its own size"
                )
        return None
    size, counts = segmentation["size"], segmentation["counts"]
    if size != [height, width] or not all(_is_int(v) for v in size):
        return f"segmentation RLE size {json.dumps(size)[:40]} is not the image's [height, width] [{height}, {width}]"
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
        if counts is None:
            return "segmentation RLE counts is not a valid compressed RLE string"
    elif not all(_is_int(v) and 0 <= v < 2**32 for v in counts):
        return "segmentation RLE counts must be non-negative integers"
    if sum(counts) != height * width:
        return f"segmentation RLE counts add up to {sum(counts)}, not height x width = {height * width}"
    return None


def _rle_string_counts(text: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string, or None when it is malformed.

    Format (pycocotools' maskApi): each count is stored in 5-bit groups, least significant first, as characters
    offset by 48; bit 0x20 marks a following group and bit 0x10 of the last group is the sign. From the third
    count on, the value stored is the difference to the count two places before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if not 0 <= value < 2**32:
            return None
        counts.append(value)
    return counts


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
