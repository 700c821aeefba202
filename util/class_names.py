"""Category names: the 91-id COCO detection list and helpers to resolve names for any model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

# COCO 2017 category id -> name. Ids 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 exist in the original
# COCO paper's list but have no annotations; DETR keeps the raw ids, hence 91 classes (0 is unused).
_COCO_IDS_TO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}  # fmt: skip

#: Index = COCO category id (0..90); unused ids are "N/A".
COCO_CLASSES: list[str] = [_COCO_IDS_TO_NAMES.get(i, "N/A") for i in range(91)]


def names_from_categories(categories: Sequence[Mapping] | Mapping) -> dict[int, str]:
    """Turn COCO-style categories into ``{category_id: name}``.

    Accepts a list of ``{"id": int, "name": str}`` (the "categories" field of a COCO annotation file),
    a whole annotation file dict with a "categories" field, a ``{id: name}`` mapping (JSON string keys
    are fine) or a plain list of names indexed by id.
    """
    if isinstance(categories, Mapping) and "categories" in categories:
        categories = categories["categories"]
    if isinstance(categories, Mapping):
        return {int(k): str(v) for k, v in categories.items()}
    names: dict[int, str] = {}
    for index, entry in enumerate(categories):
        if isinstance(entry, str):
            names[index] = entry
        elif isinstance(entry, Mapping) and "id" in entry and "name" in entry:
            names[int(entry["id"])] = str(entry["name"])
        else:
            raise ValueError(f"category entry {index} must be a name or a dict with 'id' and 'name', got {entry!r}")
    return names


def load_categories_file(path: str | Path) -> dict[int, str]:
    """Read ``{category_id: name}`` from a JSON file (COCO annotation file, categories list, or id->name map)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read categories JSON ({err}); pass a COCO annotation file or a list") from err
    try:
        return names_from_categories(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def resolve_class_names(checkpoint: Mapping | None, num_classes: int, categories_file: str | None = None) -> dict:
    """Pick the class names for a model.

    Order: an explicit ``categories_file``; a 'class_names' or 'categories' entry of the checkpoint;
    the COCO names for a 91-class model; otherwise an empty mapping (callers fall back to "class N").
    """
    if categories_file:
        return load_categories_file(categories_file)
    if checkpoint is not None:
        for key in ("class_names", "categories"):
            if key in checkpoint and checkpoint[key]:
                return names_from_categories(checkpoint[key])
    if num_classes == len(COCO_CLASSES):
        return dict(enumerate(COCO_CLASSES))
    return {}


def class_name(names: Mapping[int, str], label: int) -> str:
    """Name of ``label`` in ``names``, or ``"class <label>"`` when unknown."""
    return names.get(int(label), f"class {int(label)}")


def category_ids(checkpoint: Mapping | None, num_classes: int, categories_file: str | None = None) -> list[int] | None:
    """Class ids that are categories of the model's dataset, or None when nothing says which are.

    The categories come from ``categories_file`` or the checkpoint's stored 'class_names' / 'categories' (every
    training checkpoint of this project has them). Published checkpoints store none: None, all ids stay. Only
    ids the model can output (0 <= id < ``num_classes``) count.

    Raises:
        ValueError: the categories name no id in [0, num_classes) (a categories file of another dataset).
    """
    names: Mapping[int, str] = {}
    if categories_file:
        names = load_categories_file(categories_file)
    elif checkpoint is not None:
        stored = next((checkpoint[k] for k in ("class_names", "categories") if checkpoint.get(k)), None)
        names = names_from_categories(stored) if stored is not None else {}
    if not names:
        return None
    ids = sorted(i for i in names if 0 <= i < num_classes)
    if not ids:
        source = categories_file or "the checkpoint's class_names"
        raise ValueError(
            f"{source}: no category id ({min(names)}..{max(names)}) is a class of this model (0..{num_classes - 1})"
        )
    return ids
