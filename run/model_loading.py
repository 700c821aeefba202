"""A model rebuilt from a checkpoint alone: its family, its flags, the shapes of its weights.

Used by predict.py, tools/, hubconf.py and ``--resume`` without ``--model``. Checkpoints of this project store
every flag (``model`` included); published files store an argparse.Namespace without ``model`` (DETR, Deformable
DETR) or with DINO's ``modelname``, and a few of their stored sizes disagree with their weights: the weights'
shapes win (``Family.architecture``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from cli.arguments import get_args_parser
from models import FAMILIES, build_model, family_of_state_dict
from models.backbone import check_backbone_name
from models.state_dict import key_prefix
from run.checkpoint import checkpoint_args_to_namespace, inference_weights, load_checkpoint

__all__ = [
    "checkpoint_family",
    "infer_architecture",
    "input_transform",
    "labels_are_indices",
    "load_model",
    "model_args_from_checkpoint",
    "stored_category_ids",
]

# Flags that only make sense for the run that wrote the checkpoint: a rebuilt model never re-reads them.
_RUN_ONLY = {"backbone_weights": "none", "frozen_weights": None, "resume": "", "finetune": None}


def checkpoint_family(checkpoint: Mapping[str, Any]) -> str:
    """The ``--model`` of a checkpoint: its stored args, else what its state-dict keys imply."""
    stored = checkpoint.get("args")
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else (stored or {})
    for key in ("model", "modelname"):  # modelname: the published DINO code's flag
        if stored.get(key) in FAMILIES:
            return stored[key]
    return family_of_state_dict(inference_weights(checkpoint) or {})


def infer_architecture(state: Mapping[str, Tensor], family: str | None = None) -> dict[str, Any]:
    """Flag values a state dict implies (None where its keys do not say); ``family`` None: told by the keys."""
    return FAMILIES[family or family_of_state_dict(state)].architecture(state)


def model_args_from_checkpoint(checkpoint: Mapping[str, Any], device: str = "cpu") -> argparse.Namespace:
    """Flags that rebuild the checkpoint's model: family defaults < stored 'args' < state-dict shapes.

    The backbone is built without downloading ImageNet weights (the checkpoint holds them).
    """
    weights = inference_weights(checkpoint)
    if weights is None:
        raise ValueError("checkpoint has no 'model' (or 'ema.module') state dict")
    family = checkpoint_family(checkpoint)
    values = vars(get_args_parser().parse_args(["--model", family]))
    stored = checkpoint_args_to_namespace(checkpoint.get("args"))
    if stored is not None:
        values.update(vars(stored))
    values["model"] = family  # published files store no --model
    values.update({k: v for k, v in infer_architecture(weights, family).items() if v is not None})
    check_backbone_name(weights, values["backbone"], key_prefix(weights))  # a timm model's name is not in its keys
    values.update(_RUN_ONLY, device=device)
    return argparse.Namespace(**values)


def load_model(
    checkpoint_path: str, device: str = "cpu", checkpoint: Mapping | None = None
) -> tuple[nn.Module, dict[str, nn.Module], argparse.Namespace, Mapping]:
    """Build the checkpoint's model in eval mode on ``device`` and load its weights (strict): the EMA weights
    (``ema.module``) when the checkpoint has them, else ``model``.

    Returns:
        (model, postprocessors, the flags it was built from, the checkpoint dict).

    Raises:
        ValueError: the weights do not fit the rebuilt model (one line naming the file).
    """
    if checkpoint is None:
        checkpoint = load_checkpoint(checkpoint_path, hint="check the --checkpoint path")
    args = model_args_from_checkpoint(checkpoint, device=device)
    model, _, postprocessors = build_model(args)
    try:
        model.load_state_dict(inference_weights(checkpoint), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0:3]
        raise ValueError(f"{checkpoint_path}: weights do not fit the rebuilt model ({' '.join(first)})") from None
    if labels_are_indices(args):
        ids = stored_category_ids(checkpoint)  # this project's runs store the dataset's categories
        if ids is not None and len(ids) <= args.num_classes:
            postprocessors["bbox"].set_category_ids(ids, args.num_classes)
    return model.to(device).eval(), postprocessors, args, checkpoint


def labels_are_indices(args: argparse.Namespace) -> bool:
    """True when the model's labels are indices of its dataset's sorted category ids (``Family.contiguous_labels``);
    its 'bbox' postprocessor then reports the ids themselves."""
    family = FAMILIES[args.model]
    return family.contiguous_labels is not None and family.contiguous_labels(family.make_settings(vars(args)))


def stored_category_ids(checkpoint: Mapping[str, Any]) -> list[int] | None:
    """The sorted category ids of a checkpoint's stored 'class_names' ({id: name}), or None."""
    names = checkpoint.get("class_names")
    return sorted(int(i) for i in names) if isinstance(names, Mapping) and names else None


def input_transform(args: argparse.Namespace) -> Callable | None:
    """The family's own eval transform of a model built from ``args`` (``Family.data_transforms('val')``:
    ``transform(image, None) -> (tensor, None)``), or None for the framework's (DETR's) resize and normalisation."""
    family = FAMILIES[args.model]
    if family.data_transforms is None:
        return None
    return family.data_transforms("val", family.make_settings(vars(args)), None)
