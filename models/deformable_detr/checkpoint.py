"""Recognising and rebuilding Deformable DETR checkpoints (published and this project's) from their state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..backbone import backbone_of
from ..state_dict import count_layers, key_prefix

__all__ = ["architecture", "has_denoising", "is_multi_scale", "multi_scale_architecture", "owns_state_dict"]


def is_multi_scale(state: Mapping[str, Tensor]) -> bool:
    """A deformable-attention family's state dict (it has the multi-scale ``transformer.level_embed``)."""
    return f"{key_prefix(state)}transformer.level_embed" in state


def has_denoising(state: Mapping[str, Tensor]) -> bool:
    """DINO's denoising label embedding or decoder query embedding (no Deformable DETR counterpart)."""
    prefix = key_prefix(state)
    return f"{prefix}label_enc.weight" in state or f"{prefix}transformer.tgt_embed.weight" in state


def owns_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for a Deformable DETR state dict: multi-scale, without DINO's denoising embeddings."""
    return is_multi_scale(state) and not has_denoising(state)


def multi_scale_architecture(state: Mapping[str, Tensor], title: str) -> dict[str, Any]:
    """Flags every deformable family's state dict tells (per-layer heads ``class_embed.{l}``): num_classes,
    hidden_dim, num_feature_levels, dim_feedforward, enc_layers, dec_layers, backbone (a ResNet or Swin the keys
    tell, else None); num_queries None."""
    if "class_embed.0.weight" not in state or "transformer.level_embed" not in state:
        raise ValueError(f"state dict has no class_embed.0/transformer.level_embed: not a {title} checkpoint")
    classes = state["class_embed.0.weight"]
    return {
        "num_classes": classes.shape[0],  # sigmoid classes: no "no object" logit
        "hidden_dim": classes.shape[1],
        "num_feature_levels": state["transformer.level_embed"].shape[0],
        "dim_feedforward": state["transformer.encoder.layers.0.linear1.weight"].shape[0],
        "enc_layers": count_layers(state, "encoder"),
        "dec_layers": count_layers(state, "decoder"),
        "backbone": backbone_of(state),  # None for a timm model: its name comes from the stored args
        "num_queries": None,  # two-stage Deformable DETR: the proposal count is not a weight
    }


def architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """``multi_scale_architecture`` plus two_stage, with_box_refine and (with learned queries) num_queries.

    Raises:
        ValueError: not a Deformable DETR state dict (no class_embed.0 / transformer.level_embed).
    """
    arch = multi_scale_architecture(state, "deformable_detr")
    arch["two_stage"] = "transformer.enc_output.weight" in state
    arch["with_box_refine"] = "transformer.decoder.bbox_embed.0.layers.0.weight" in state
    if "query_embed.weight" in state:
        arch["num_queries"] = state["query_embed.weight"].shape[0]
    return arch
