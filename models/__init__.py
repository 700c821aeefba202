"""The detector families: the table ``FAMILIES`` and ``build_model(args)``, where parsed flags enter models/.

Each family lives in its folder (``models/<name>/``) and is reached only through its ``FAMILY`` row
(``models.family.Family``); the shared parts (backbone, attention, heads, matcher, criteria, ...) sit beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from torch import Tensor

from . import deformable_detr, detr, dino, rtdetrv2
from .family import BuildResult, Family

__all__ = ["FAMILIES", "build_model", "family_of_state_dict"]

# --model -> its family. Adding a family: its folder plus one line here (docs/adding_a_family.md).
FAMILIES: dict[str, Family] = {
    "detr": detr.FAMILY,
    "deformable_detr": deformable_detr.FAMILY,
    "dino": dino.FAMILY,
    "rtdetrv2": rtdetrv2.FAMILY,
}


def build_model(args: argparse.Namespace, num_classes: int | None = None) -> BuildResult:
    """Build the detector of ``args.model``, its criterion and postprocessors from parsed flags.

    Args:
        args: the parsed command line (``--model`` absent: DETR, as a published DETR Namespace).
        num_classes: classifier size; None: ``--num_classes``, else the family's default for ``--dataset_file``.

    Returns:
        (model, criterion, postprocessors).

    Raises:
        ValueError: an unknown --model, or flags the family refuses (named in the message).
    """
    values = vars(args)
    name = values.get("model", "detr")  # published DETR Namespaces have no --model
    if name not in FAMILIES:
        raise ValueError(f"--model {name}: expected one of {tuple(FAMILIES)}")
    family = FAMILIES[name]
    settings = family.make_settings(values)
    if num_classes is None:
        num_classes = settings.num_classes
    if num_classes is None:
        defaults = family.default_num_classes
        # Published: every dataset other than coco_panoptic gets COCO's 91.
        num_classes = defaults.get(settings.dataset_file, defaults["coco"])
    return family.build(settings, num_classes)


def family_of_state_dict(state: Mapping[str, Tensor]) -> str:
    """The family (``--model``) whose ``owns_state_dict`` accepts ``state`` (published or this project's keys).

    Raises:
        ValueError: no family or more than one claims it.
    """
    owners = [name for name, family in FAMILIES.items() if family.owns_state_dict(state)]
    if len(owners) != 1:
        raise ValueError(f"state dict claimed by {owners or 'no family'}: expected exactly one of {tuple(FAMILIES)}")
    return owners[0]
