"""DETR-family models: ``build_model(args) -> (model, criterion, postprocessors)`` for ``args.model``."""

from __future__ import annotations

import argparse

from torch import nn

from util.arguments import family_flag_error

from .criterion import SetCriterion

__all__ = ["FAMILIES", "build_model"]

FAMILIES = ("detr", "deformable_detr", "dino")


def build_model(args: argparse.Namespace) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the detector of ``args.model`` (default 'detr'), its criterion and postprocessors from parsed
    ``main.get_args_parser()`` args."""
    family = getattr(args, "model", "detr")
    if family == "detr":
        for flag in ("with_box_refine", "two_stage"):
            if getattr(args, flag, False):  # a published Deformable DETR command line without --model
                raise ValueError(family_flag_error([flag], "detr"))
        from .detr import build
    elif family == "deformable_detr":
        from .deformable_detr import build
    elif family == "dino":
        from .dino import build
    else:
        raise ValueError(f"--model {family}: expected one of {FAMILIES}")
    return build(args)
