"""DETR models: ``build_model(args) -> (model, criterion, postprocessors)``."""

from __future__ import annotations

import argparse

from torch import nn

from .criterion import SetCriterion
from .detr import build

__all__ = ["build_model"]


def build_model(args: argparse.Namespace) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the detector, its SetCriterion and postprocessors from parsed ``main.get_args_parser()`` args."""
    return build(args)
