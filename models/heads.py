"""Prediction heads shared by the families: the box MLP, the focal-prior class/box head pair, aux-output dicts."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "aux_outputs", "build_detection_heads", "init_detection_heads"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (the box head; parameters ``layers.i``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """[..., input_dim] -> [..., output_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == self.num_layers - 1 else F.relu(layer(x))
        return x


def init_detection_heads(class_embed: nn.Linear, bbox_embed: MLP, prior_prob: float = 0.01) -> None:
    """Focal-loss prior on the class bias (every class starts at probability 0.01); box head's last layer zero."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.constant_(bbox_embed.layers[-1].weight, 0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0)


def build_detection_heads(hidden_dim: int, num_classes: int) -> tuple[nn.Linear, MLP]:
    """The sigmoid-class head (K logits, no "no object") and the 3-layer box MLP, initialised by
    ``init_detection_heads`` (created in this order: it fixes the random init of a seeded build)."""
    class_embed = nn.Linear(hidden_dim, num_classes)
    bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
    init_detection_heads(class_embed, bbox_embed)
    return class_embed, bbox_embed


def aux_outputs(logits: Tensor, boxes: Tensor) -> list[dict[str, Tensor]]:
    """Per-layer predictions [L, B, Q, C] and [L, B, Q, 4] (or L-lists) -> the L - 1 earlier layers as
    {'pred_logits', 'pred_boxes'} dicts, first layer first (the 'aux_outputs' of every family)."""
    return [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
