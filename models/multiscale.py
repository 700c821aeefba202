"""Multi-scale parts shared by the deformable families: backbone levels, input projections, top-k query selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .backbone import Joiner, _downsample_mask_nearest, build_backbone

if TYPE_CHECKING:
    from .settings import DetectorSettings

__all__ = ["build_input_proj", "build_multiscale_backbone", "project_levels", "select_top_queries"]


def build_input_proj(backbone_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """``input_proj.{l}``: 1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 convs for extra levels
    (the first reads the last backbone map, later ones the previous projected level)."""
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)) for c in backbone_channels]
    in_channels = backbone_channels[-1]
    for _ in range(num_feature_levels - len(backbone_channels)):
        projections.append(
            nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim))
        )
        in_channels = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projections)


def project_levels(backbone: Joiner, input_proj: nn.ModuleList, samples: NestedTensor | list[Tensor] | Tensor):
    """Backbone levels plus the extra stride-2 levels -> (srcs, masks, positions), L each, finest first.

    ``samples``: a NestedTensor, a list of [3, H_i, W_i] images (padded here) or a [B, 3, H, W] batch.
    """
    if not isinstance(samples, NestedTensor):
        samples = nested_tensor_from_tensor_list(samples)
    if samples.mask is None:
        images = samples.tensors
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        samples = NestedTensor(images, mask)
    features, pos = backbone(samples)
    srcs = [proj(feature.tensors) for proj, feature in zip(input_proj, features)]
    masks = [feature.mask for feature in features]
    pos = list(pos)
    image_mask = samples.mask
    for lvl in range(len(features), len(input_proj)):
        # The first extra level reads the raw last backbone map, the next ones the previous projected level.
        src = input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
        # Extra levels resize the image mask itself, not the previous level's mask.
        mask = _downsample_mask_nearest(image_mask, src.shape[-2:])
        srcs.append(src)
        masks.append(mask)
        pos.append(backbone[1](NestedTensor(src, mask)).to(src.dtype))
    return srcs, masks, pos


def build_multiscale_backbone(
    settings: DetectorSettings, stage_indices: Sequence[int], **position: float | None
) -> Joiner:
    """Backbone returning ResNet stages ``stage_indices`` (0 = layer1), with the family's position encoding.

    ``settings.backbone_stages`` (this project's truncated ResNet, e.g. for the CPU demos) keeps only the stages
    below it; ``**position``: the family's sine-encoding choices (``models.position_encoding``).
    """
    return build_backbone(settings, len(stage_indices) > 1, list(stage_indices), **position)


def select_top_queries(scores: Tensor, num_queries: int, *tensors: Tensor) -> list[Tensor]:
    """The ``num_queries`` best encoder tokens of each image by ``scores`` [B, S] -> each of ``tensors``
    [B, S, C] gathered at them, [B, num_queries, C] (two-stage proposals; DINO's mixed query selection).

    Raises (torch.topk) when S < num_queries.
    """
    topk = torch.topk(scores, num_queries, dim=1)[1]
    return [torch.gather(x, 1, topk.unsqueeze(-1).expand(-1, -1, x.shape[-1])) for x in tensors]
