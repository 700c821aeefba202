"""What every backbone shares (ResNet, Swin, timm): the frozen batch norm and the padding-mask resize.

A module of its own so that ``models.backbone`` can build the Swin and timm backbones, which import these, without
an import circle.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import ops

__all__ = ["FrozenBatchNorm2d", "downsample_mask_nearest"]


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers and float32 numbers) that keeps the input's dtype.

    Under bf16/fp16 autocast the float32 buffers would otherwise promote every activation back to float32,
    about a fifth of an R50 step on CPU: the affine is folded in float32 and applied in the input's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


def downsample_mask_nearest(mask: Tensor, size: list[int]) -> Tensor:
    """Nearest-neighbour resize of a [B, H, W] bool mask to ``size`` (h, w), equal to ``F.interpolate(mode="nearest")``.

    Indexing with explicit source rows/columns instead of interpolating keeps ONNX exports exact: ONNX's
    nearest resize can round a source coordinate like 29.9999 differently and flip a whole mask row.
    """
    rows = _nearest_source_indices(mask.shape[-2], size[0], mask.device)
    cols = _nearest_source_indices(mask.shape[-1], size[1], mask.device)
    return mask[:, rows][:, :, cols]


def _nearest_source_indices(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """floor(i * (size_in / size_out)) in float32 for i < size_out, clamped: F.interpolate's nearest rule.

    The scale is a float32 tensor rather than a Python float so that exports with symbolic sizes (the dynamo
    ONNX exporter) can compute it; the float32 division of the two integer sizes gives the same scale.
    """
    scale = torch.full((), size_in, dtype=torch.float32, device=device) / size_out
    return (torch.arange(size_out, device=device) * scale).floor().long().clamp(max=size_in - 1)
