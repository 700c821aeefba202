"""DETR for segmentation (paper section 4.4): attention maps, FPN-style mask head, mask losses, post-processing.

State-dict names equal the published panoptic checkpoints': the detector under ``detr.``, then
``bbox_attention.{q_linear,k_linear}`` and ``mask_head.{lay1..lay5, gn1..gn5, adapter1..3, out_lay}``.
The post-processors (``segmentation_postprocess.py``) and the mask losses (``models/criterion.py``) are
re-exported here under their published names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import NestedTensor

# The mask losses are computed by SetCriterion; they are importable here under their published path.
from ..criterion import dice_loss, sigmoid_focal_loss
from .model import as_nested_tensor
from .segmentation_postprocess import PostProcessPanoptic, PostProcessSegm

__all__ = [
    "DETRsegm",
    "MHAttentionMap",
    "MaskHeadSmallConv",
    "PostProcessPanoptic",
    "PostProcessSegm",
    "dice_loss",
    "sigmoid_focal_loss",
]


def _group_norm(channels: int) -> nn.GroupNorm:
    # 8 groups as published; tiny test widths that 8 does not divide fall back to the largest divisor of 8.
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _lowest_value(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).min`` of the floating dtypes attention runs in (TorchScript cannot call finfo)."""
    if dtype == torch.float16:
        return -65504.0
    if dtype == torch.bfloat16:
        return -3.3895313892515355e38
    if dtype == torch.float64:
        return -1.7976931348623157e308
    return -3.4028234663852886e38


class MHAttentionMap(nn.Module):
    """Multi-head attention weights of queries over a feature map (no values, no output projection).

    Args:
        query_dim: width of the queries and of the feature map.
        hidden_dim: projected width, split over ``num_heads``.
        num_heads: attention heads.
        dropout: dropout on the attention weights.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by nheads {num_heads}")
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            if bias:
                nn.init.zeros_(linear.bias)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention maps.

        Args:
            q: [B, Q, query_dim] decoder output.
            k: [B, query_dim, H, W] encoder memory.
            mask: [B, H, W] bool, True on padding.

        Returns:
            [B, Q, num_heads, H, W] weights; as published, one softmax runs over heads and pixels jointly,
            so each query's maps sum to 1 over (heads, H, W).
        """
        batch, _, height, width = k.shape
        head_dim = self.hidden_dim // self.num_heads
        q = self.q_linear(q).view(batch, q.shape[1], self.num_heads, head_dim)
        k = F.linear(k.flatten(2).transpose(1, 2), self.k_linear.weight, self.k_linear.bias)
        k = k.view(batch, height * width, self.num_heads, head_dim)
        weights = torch.einsum("bqnc,bpnc->bqnp", q * self.normalize_fact, k)
        if mask is not None:
            weights = weights.masked_fill(mask.flatten(1)[:, None, None, :], _lowest_value(weights.dtype))
        weights = weights.flatten(2).softmax(dim=-1).view(batch, -1, self.num_heads, height, width)
        return self.dropout(weights)


class MaskHeadSmallConv(nn.Module):
    """FPN-style convolutional mask head: attention maps + features at stride 32 -> mask logits at stride 4.

    Args:
        dim: input channels, hidden_dim + nheads (projected features concatenated with the attention maps).
        fpn_dims: channels of the backbone stages used for upsampling, coarsest first (layer3, layer2, layer1).
        context_dim: hidden_dim; sets the widths context_dim / 2, / 4, / 8, / 16 of lay2..lay5.
    """

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int):
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        if min(widths) < 1:
            raise ValueError(f"hidden_dim {context_dim} is too small for the mask head (needs at least 16)")
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = _group_norm(dim)
        self.lay2 = nn.Conv2d(dim, widths[1], 3, padding=1)
        self.gn2 = _group_norm(widths[1])
        self.lay3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.gn3 = _group_norm(widths[2])
        self.lay4 = nn.Conv2d(widths[2], widths[3], 3, padding=1)
        self.gn4 = _group_norm(widths[3])
        self.lay5 = nn.Conv2d(widths[3], widths[4], 3, padding=1)
        self.gn5 = _group_norm(widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], widths[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], widths[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], widths[3], 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.constant_(module.bias, 0)

    def _first_conv(self, x: Tensor, bbox_mask: Tensor) -> Tensor:
        # lay1 over cat([features repeated per query, attention maps]) equals, by linearity, the feature part
        # convolved once per image plus the attention part per query: the same numbers for ~Q times less work.
        batch, queries = bbox_mask.shape[:2]
        channels = x.shape[1]
        weight = self.lay1.weight
        per_image = F.conv2d(x, weight[:, :channels], self.lay1.bias, padding=1)
        per_query = F.conv2d(bbox_mask.flatten(0, 1), weight[:, channels:], padding=1)
        out = per_image.unsqueeze(1) + per_query.unflatten(0, (batch, queries))
        return out.flatten(0, 1)

    @staticmethod
    def _add_fpn(x: Tensor, fpn: Tensor) -> Tensor:
        """[B * Q, C, h, w] per-query maps + adapted [B, C, H, W] features -> [B * Q, C, H, W]."""
        up = F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
        up = up.unflatten(0, (fpn.shape[0], -1)) + fpn.unsqueeze(1)
        return up.flatten(0, 1)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: list[Tensor]) -> Tensor:
        """Mask logits.

        Args:
            x: [B, hidden_dim, H, W] projected backbone features (stride 32).
            bbox_mask: [B, Q, nheads, H, W] attention maps from MHAttentionMap.
            fpns: backbone features [B, C_i, H_i, W_i] of layer3, layer2, layer1 (strides 16, 8, 4).

        Returns:
            [B * Q, 1, H_4, W_4] mask logits at the resolution of ``fpns[2]``, query-major within each image.
        """
        if x.shape[1] + bbox_mask.shape[2] != self.dim:
            raise ValueError(f"mask head expects {self.dim} input channels, got {x.shape[1]} + {bbox_mask.shape[2]}")
        x = F.relu(self.gn1(self._first_conv(x, bbox_mask)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = F.relu(self.gn3(self.lay3(self._add_fpn(x, self.adapter1(fpns[0])))))
        x = F.relu(self.gn4(self.lay4(self._add_fpn(x, self.adapter2(fpns[1])))))
        x = F.relu(self.gn5(self.lay5(self._add_fpn(x, self.adapter3(fpns[2])))))
        return self.out_lay(x)


class DETRsegm(nn.Module):
    """DETR with a mask head: adds 'pred_masks' [B, Q, H/4, W/4] (logits) to the detector's outputs.

    Args:
        detr: a ``models.detr.DETR`` whose backbone returns all four ResNet stages (built with --masks).
        freeze_detr: freeze every detector parameter (second training stage, --frozen_weights).
    """

    def __init__(self, detr: nn.Module, freeze_detr: bool = False):
        super().__init__()
        self.detr = detr
        if freeze_detr:
            for p in self.detr.parameters():
                p.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        last = detr.backbone.num_channels  # layer4; layer3, layer2, layer1 have 1/2, 1/4, 1/8 of it
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, [last // 2, last // 4, last // 8], hidden_dim)

    # Read-only views of the detector's parts, so code written for DETR (channels_last, compile, attention
    # hooks) also works on the wrapper; they add no state-dict entries (and TorchScript does not compile them).
    __jit_unused_properties__ = ["backbone", "transformer", "num_queries"]

    @property
    def backbone(self) -> nn.Module:
        return self.detr.backbone

    @property
    def transformer(self) -> nn.Module:
        return self.detr.transformer

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    # No return annotation: TorchScript infers Dict[str, Tensor]; the eager dict may also hold 'aux_outputs'.
    def forward(self, samples: NestedTensor | list[Tensor] | Tensor):
        """Detect and segment.

        Args:
            samples: NestedTensor ([B, 3, H, W] images, [B, H, W] padding mask), a list of [3, H_i, W_i] images or
                a [B, 3, H, W] batch without padding.

        Returns:
            {'pred_logits' [B, Q, K + 1], 'pred_boxes' [B, Q, 4] normalised cxcywh, 'pred_masks' [B, Q, H_4, W_4]
            mask logits on the padded stride-4 grid, 'aux_outputs' (boxes and logits only) with auxiliary loss}.
        """
        samples = as_nested_tensor(samples)
        detr = self.detr
        features, pos = detr.backbone(samples)
        if len(features) != 4:
            raise ValueError("DETRsegm needs the backbone's four stages: build the detector with --masks")
        src, mask = features[-1].decompose()
        src_proj = detr.input_proj(src)
        hs, memory = detr.run_transformer(src_proj, mask, pos[-1])
        out = self._detection_outputs(hs)
        bbox_mask = self.bbox_attention(hs[-1], memory, mask=mask)
        fpns = [features[2].tensors, features[1].tensors, features[0].tensors]
        masks = self.mask_head(src_proj, bbox_mask, fpns)
        # [B * Q, 1, H_4, W_4] -> [B, Q, H_4, W_4]; only dim 0 is reshaped, so torch.export adds no guard on H, W.
        out["pred_masks"] = masks.squeeze(1).unflatten(0, (hs.shape[1], hs.shape[2]))
        return out

    def _detection_outputs(self, hs: Tensor):
        detr = self.detr
        logits = detr.class_embed(hs)
        boxes = detr.predict_boxes(hs)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if not torch.jit.is_scripting():  # scripted: Dict[str, Tensor], no auxiliary outputs
            if detr.aux_loss:
                out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def __prepare_scriptable__(self) -> DETRsegm:
        self.detr.__prepare_scriptable__()  # refuses the eager-only decoder options
        return self
