"""Recognising and rebuilding RT-DETRv2 checkpoints (published ``ema.module`` / ``model`` and this project's)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..presnet import PRESNET_DEPTHS

__all__ = ["architecture", "owns_state_dict"]

# Keys every RT-DETRv2 state dict has (the hybrid encoder's first input projection, the decoder's encoder head).
_MARKERS = ("encoder.input_proj.0.conv.weight", "decoder.enc_score_head.weight")
_LEVELS = 3  # the hybrid encoder's levels (strides 8, 16, 32)


def owns_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for an RT-DETRv2 state dict: the hybrid encoder's ``encoder.input_proj`` and the decoder's
    ``enc_score_head`` at the top level (no other family has top-level ``encoder.`` / ``decoder.`` modules)."""
    return all(key in state for key in _MARKERS)


def _count(state: Mapping[str, Tensor], head: str) -> int:
    """Distinct indices i of keys ``{head}{i}.*``."""
    return len({k[len(head) :].split(".")[0] for k in state if k.startswith(head)})


def _backbone_name(state: Mapping[str, Tensor]) -> str | None:
    bottleneck = "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in state
    blocks = tuple(_count(state, f"backbone.res_layers.{s}.blocks.") for s in range(4))
    for depth, counts in PRESNET_DEPTHS.items():
        if counts == blocks and (depth >= 50) == bottleneck:
            return f"presnet{depth}vd"
    return None


def _eval_size(state: Mapping[str, Tensor]) -> list[int] | None:
    """[S, S] from the saved anchors [1, N, 4]: a square S x S input has N = 21 (S/32)^2 anchors (strides 8, 16,
    32); [] without saved anchors (built with no eval size); None when not square (the weights do not say)."""
    anchors = state.get("decoder.anchors")
    if anchors is None:
        return []
    if anchors.ndim != 3 or anchors.shape[1] % 21:
        return None
    side = math.isqrt(anchors.shape[1] // 21)
    return [32 * side, 32 * side] if 21 * side * side == anchors.shape[1] else None


def architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Flags an RT-DETRv2 state dict implies: backbone, freeze_norm, the encoder's enc_hidden_dim /
    enc_dim_feedforward / enc_expansion / enc_layers, the decoder's hidden_dim / nheads / dec_layers /
    dim_feedforward / dec_n_points, num_feature_levels, num_classes and eval_spatial_size; dn_number 0 when the
    denoising embedding is absent. num_queries, eval_idx, freeze_at and a non-zero dn_number are not weights: None.

    Raises:
        ValueError: not an RT-DETRv2 state dict.
    """
    if not owns_state_dict(state):
        raise ValueError(f"state dict has no {' / '.join(_MARKERS)}: not an RT-DETRv2 checkpoint")
    enc_hidden = state["encoder.input_proj.0.conv.weight"].shape[0]
    fpn = state.get("encoder.fpn_blocks.0.conv1.conv.weight")
    scale = state["decoder.decoder.layers.0.cross_attn.num_points_scale"]
    weights = state["decoder.decoder.layers.0.cross_attn.attention_weights.weight"]
    encoder_layer = "encoder.encoder.0.layers.0.linear1.weight"
    return {
        "backbone": _backbone_name(state),
        "freeze_norm": "backbone.conv1.conv1_1.norm.num_batches_tracked" not in state,  # FrozenBN has no counter
        "freeze_at": None,
        "enc_hidden_dim": enc_hidden,
        "enc_dim_feedforward": state[encoder_layer].shape[0] if encoder_layer in state else None,
        "enc_expansion": None if fpn is None else fpn.shape[0] / enc_hidden,
        "enc_layers": _count(state, "encoder.encoder.0.layers."),
        "hidden_dim": state["decoder.input_proj.0.conv.weight"].shape[0],
        "nheads": weights.shape[0] // scale.numel(),
        "dec_layers": _count(state, "decoder.decoder.layers."),
        "dim_feedforward": state["decoder.decoder.layers.0.linear1.weight"].shape[0],
        "num_feature_levels": _count(state, "decoder.input_proj."),
        "dec_n_points": scale.numel() // _LEVELS,
        "num_classes": state["decoder.enc_score_head.weight"].shape[0],
        "eval_spatial_size": _eval_size(state),
        "num_queries": None,
        "eval_idx": None,
        "dn_number": None if "decoder.denoising_class_embed.weight" in state else 0,  # the embedding needs dn > 0
    }
