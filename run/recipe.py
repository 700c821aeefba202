"""The training recipe a run builds from its flags: optimizer parameter groups, lr schedule, and a family's own
data numbering and pipeline (``Family.contiguous_labels`` / ``data_transforms`` / ``batch_collate``).

Driven by flags and Family fields only: RT-DETRv2's published solver follows from its defaults
(``--norm_weight_decay 0``: ``run.param_groups``; ``--warmup_iters`` / ``--ema_decay``: main's training loop).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cli.config import UsageError
from models.family import Family
from run.param_groups import build_param_groups

__all__ = ["apply_family_data", "build_lr_scheduler", "build_optimizer", "class_numbering"]


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The published parameter groups, by substring of the parameter name: --lr_backbone_names at lr_backbone,
    --lr_linear_proj_names (Deformable DETR / DINO sampling offsets and reference points) at lr x
    lr_linear_proj_mult, the rest at lr. AdamW (SGD with momentum 0.9 under --sgd)."""
    if args.norm_weight_decay is not None or args.bias_weight_decay is not None:
        # RT-DETRv2's published groups: backbone at lr_backbone, norms (and biases) at their own weight decay.
        groups = build_param_groups(
            model, lr=args.lr, lr_backbone=args.lr_backbone, weight_decay=args.weight_decay,
            norm_weight_decay=args.norm_weight_decay, bias_weight_decay=args.bias_weight_decay,
            backbone_prefix=args.lr_backbone_names,
        )  # fmt: skip
        params = [p for g in groups for p in g["params"]]
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=_fusable(params))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def matches(name: str, keywords: list[str]) -> bool:
        return any(k in name for k in keywords)

    backbone, linear_proj = args.lr_backbone_names, args.lr_linear_proj_names
    param_dicts = [
        {"params": [p for n, p in named if not matches(n, backbone) and not matches(n, linear_proj)], "lr": args.lr},
        {"params": [p for n, p in named if matches(n, backbone)], "lr": args.lr_backbone},
    ]
    if linear_proj:  # DETR's optimizer keeps its published two groups (and its checkpoints' layout)
        param_dicts.append(
            {"params": [p for n, p in named if matches(n, linear_proj)], "lr": args.lr * args.lr_linear_proj_mult}
        )
    if args.sgd:
        return torch.optim.SGD(param_dicts, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(
        param_dicts, lr=args.lr, weight_decay=args.weight_decay, fused=_fusable([p for _, p in named])
    )


def _fusable(params: list[torch.Tensor]) -> bool | None:
    """True when AdamW's fused kernel (one launch for all tensors; the same update, a few % of a CPU/CUDA step
    faster) supports every parameter's device, else None (torch's default choice)."""
    return (bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)) or None


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    """StepLR(--lr_drop) as published; MultiStepLR at --lr_drop_epochs when given."""
    if args.lr_drop_epochs:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(args.lr_drop_epochs))
    return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def class_numbering(family: Family, settings: Any, data: Any, num_classes: int | None) -> tuple[list[int] | None, int]:
    """(category ids or None, classifier size) of a run.

    With the family's ``contiguous_labels``: the training annotations' sorted category ids (labels are their
    indices) and their number (or ``num_classes`` when given, at least that many). Else None and
    ``datasets.num_classes_for`` (--num_classes, or the largest category id + 1).

    Raises:
        UsageError: --num_classes below the number of categories.
    """
    import datasets

    if family.contiguous_labels is None or not family.contiguous_labels(settings):
        return None, datasets.num_classes_for(data)
    category_ids = datasets.category_ids_for(data)
    size = len(category_ids) if num_classes is None else num_classes
    if size < len(category_ids):
        raise UsageError(f"--num_classes {size} is fewer than the dataset's {len(category_ids)} categories (labels "
                         "are their indices)")  # fmt: skip
    return category_ids, size


def apply_family_data(
    family: Family, settings: Any, category_ids: Sequence[int] | None, dataset_val: Any, dataset_train: Any
) -> Callable | None:
    """Give the datasets the family's own transforms (``Family.data_transforms``, labels remapped to the indices
    of ``category_ids`` when given); returns its training collation (``Family.batch_collate``) or None."""
    if family.data_transforms is not None:
        from datasets.rtdetr_transforms import CategoryMap

        category_map = CategoryMap(category_ids) if category_ids is not None else None
        for split, dataset in (("val", dataset_val), ("train", dataset_train)):
            if dataset is not None:
                dataset.transforms = family.data_transforms(split, settings, category_map)
    return None if family.batch_collate is None else family.batch_collate(settings)
