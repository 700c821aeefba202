"""Recognising and rebuilding DETR checkpoints (published and this project's) from their state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..backbone import backbone_of
from ..state_dict import count_layers, key_prefix

__all__ = ["architecture", "owns_state_dict"]


def owns_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for a DETR / DETRsegm (keys under ``detr.``) state dict: no multi-scale ``transformer.level_embed``.

    Also the answer for a state dict no family recognises (the published default family).
    """
    # Detectors with top-level encoder./decoder. modules (RT-DETR style) are not DETR: its live under transformer.
    top_level = any(k.startswith(("encoder.", "decoder.")) for k in state)
    return f"{key_prefix(state)}transformer.level_embed" not in state and not top_level


def architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """num_classes, num_queries, hidden_dim, dim_feedforward, enc_layers, dec_layers, pre_norm, masks,
    position_embedding and backbone (None: a ResNet or Swin the keys do not tell, or a timm model) of a DETR /
    DETRsegm state dict.

    Raises:
        ValueError: the state dict has no class_embed / query_embed.
    """
    prefix = key_prefix(state)
    if f"{prefix}class_embed.weight" not in state or f"{prefix}query_embed.weight" not in state:
        raise ValueError("state dict has no class_embed/query_embed: not a DETR checkpoint")
    query = state[f"{prefix}query_embed.weight"]
    return {
        "num_classes": state[f"{prefix}class_embed.weight"].shape[0] - 1,
        "num_queries": query.shape[0],
        "hidden_dim": query.shape[1],
        "dim_feedforward": state[f"{prefix}transformer.encoder.layers.0.linear1.weight"].shape[0]
        if f"{prefix}transformer.encoder.layers.0.linear1.weight" in state
        else state[f"{prefix}transformer.decoder.layers.0.linear1.weight"].shape[0],
        "enc_layers": count_layers(state, "encoder", prefix),
        "dec_layers": count_layers(state, "decoder", prefix),
        "pre_norm": f"{prefix}transformer.encoder.norm.weight" in state,
        "masks": bool(prefix),
        "position_embedding": "learned" if f"{prefix}backbone.1.row_embed.weight" in state else "sine",
        "backbone": backbone_of(state, prefix),
    }
