"""Recognising and rebuilding DINO checkpoints (published and this project's) from their state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..backbone import backbone_levels_of
from ..deformable_detr.checkpoint import has_denoising, is_multi_scale, multi_scale_architecture

__all__ = ["architecture", "owns_state_dict"]


def owns_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for a DINO state dict: multi-scale, with the denoising label embedding or decoder query embedding."""
    return is_multi_scale(state) and has_denoising(state)


def architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The multi-scale flags (``multi_scale_architecture``) plus num_queries, dn_labelbook_size and, for a Swin
    backbone, return_interm_indices (its output norms ``backbone.0.norm{i}``).

    Raises:
        ValueError: not a DINO state dict (no class_embed.0 / transformer.level_embed).
    """
    arch = multi_scale_architecture(state, "dino")
    arch["num_queries"] = state["transformer.tgt_embed.weight"].shape[0]
    arch["dn_labelbook_size"] = state["label_enc.weight"].shape[0] - 1
    arch["return_interm_indices"] = backbone_levels_of(state)
    return arch
