"""Multi-scale parts shared by the deformable families: backbone levels, input projections, top-k query selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .backbone import Joiner, build_backbone
from .feature_maps import downsample_mask_nearest
from .ms_deform_attn import _is_exporting

if TYPE_CHECKING:
    from .settings import DetectorSettings

__all__ = [
    "GroupNorm",
    "build_input_proj",
    "build_multiscale_backbone",
    "num_selected_queries",
    "project_levels",
    "select_top_queries",
]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, state-dict keys and numbers) that also takes a group of a single value.

    torch refuses a batch whose groups all hold one value ("Expected more than 1 value per channel when
    training"): the coarsest extra level of a small image is 1x1, and with ``--hidden_dim 32`` a group is one
    channel, so batch size 1 failed. GroupNorm normalises each image on its own, so the same image in a larger
    batch already got the defined answer (a zero-variance group normalises to 0: the output is the bias); the
    kernel computes it for batch size 1 too.
    """

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, *] -> [B, C, *]; ``F.group_norm`` without its batch-size check."""
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


class MultiScaleDetector(nn.Module):
    """What the deformable-attention detectors (Deformable DETR, DINO) hold alike, registered first as published:
    the transformer, then (in the subclass) heads, input projections and backbone.

    Args:
        transformer: the family's multi-scale transformer (``d_model`` = the hidden size).
        num_queries: Q; num_feature_levels: L; aux_loss: return every earlier decoder layer too.
    """

    def __init__(self, transformer: nn.Module, num_queries: int, num_feature_levels: int, aux_loss: bool):
        super().__init__()
        self.hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss


def build_input_proj(backbone_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """``input_proj.{l}``: 1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 convs for extra levels
    (the first reads the last backbone map, later ones the previous projected level)."""
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), GroupNorm(32, hidden_dim)) for c in backbone_channels]
    in_channels = backbone_channels[-1]
    for _ in range(num_feature_levels - len(backbone_channels)):
        projections.append(
            nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1), GroupNorm(32, hidden_dim))
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
        mask = downsample_mask_nearest(image_mask, src.shape[-2:])
        srcs.append(src)
        masks.append(mask)
        pos.append(backbone[1](NestedTensor(src, mask)).to(src.dtype))
    return srcs, masks, pos


def build_multiscale_backbone(
    settings: DetectorSettings, stage_indices: Sequence[int], **position: float | None
) -> Joiner:
    """Backbone (any ``build_backbone`` name: ResNet, Swin, ``timm:NAME``) returning stages ``stage_indices``
    (0 = stride 4 ... 3 = stride 32), with the family's position encoding.

    ``settings.backbone_stages`` (this project's truncated ResNet, e.g. for the CPU demos) keeps only the stages
    below it; ``**position``: the family's sine-encoding choices (``models.position_encoding``).
    """
    return build_backbone(settings, len(stage_indices) > 1, list(stage_indices), **position)


def num_selected_queries(num_queries: int, num_tokens: int) -> int:
    """How many encoder tokens two-stage / mixed query selection turns into queries: ``num_queries``, or every one
    of the ``num_tokens`` (padded tokens included, as the published top-k may pick them) when an image is too small.

    The published code raises in ``torch.topk`` then; here the model returns that many queries (fewer than
    ``num_queries``; matching, losses and post-processing take any number). While exporting it is always
    ``num_queries``: a graph keeps one k, so inputs given to it need at least that many tokens.
    """
    if _is_exporting():
        return num_queries
    return min(num_queries, num_tokens)


def select_top_queries(scores: Tensor, num_queries: int, *tensors: Tensor) -> list[Tensor]:
    """The ``num_queries`` best encoder tokens of each image by ``scores`` [B, S] -> each of ``tensors``
    [B, S, C] gathered at them, [B, Q, C] (two-stage proposals; DINO's mixed query selection).

    Q = ``num_selected_queries(num_queries, S)``: all S tokens when an image has fewer than ``num_queries``.
    """
    topk = torch.topk(scores, num_selected_queries(num_queries, scores.shape[1]), dim=1)[1]
    return [torch.gather(x, 1, topk.unsqueeze(-1).expand(-1, -1, x.shape[-1])) for x in tensors]
