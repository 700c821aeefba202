"""PResNet-vd: ResNet variant D (He et al. 2019, "Bag of Tricks", section 4.1), RT-DETR's backbone.

Variant D differs from torchvision's ResNet in two places: a stem of three 3x3 convolutions (3 -> 32 -> 32 -> 64)
instead of one 7x7, and strided projection shortcuts that average-pool (2x2, stride 2) before a 1x1 convolution
instead of striding the 1x1 convolution (which drops 3/4 of the input). Bottleneck blocks stride on the 3x3
convolution. Module names follow the published RT-DETR code so its checkpoints and its ImageNet backbone files
(``ResNet{18,34}_vd``, ``ResNet50_vd_ssld_v2``, ``ResNet101_vd_ssld``) load strictly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["PRESNET_DEPTHS", "ConvNormLayer", "PResNet", "build_presnet", "load_presnet_weights"]

# Blocks per stage for each depth (the published ResNet_cfg).
PRESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_WIDTHS = (64, 128, 256, 512)

NormLayer = Callable[[int], nn.Module]


def _frozen_bn(channels: int) -> nn.Module:
    return FrozenBatchNorm2d(channels, eps=1e-5)


class ConvNormLayer(nn.Module):
    """Conv (no bias, 'same' padding for odd kernels) + norm + optional activation (keys ``conv.*``, ``norm.*``).

    The backbone passes ``nn.ReLU(inplace=True)``: neither norm's backward reads its output, so the activation
    may overwrite it.

    Args:
        ch_in, ch_out: channels.
        kernel_size, stride: of the convolution; padding (k - 1) // 2.
        act: activation module or None (identity).
        norm_layer: channels -> norm module (BatchNorm2d, or FrozenBatchNorm2d for frozen backbones).
    """

    def __init__(
        self,
        ch_in: int,
        ch_out: int,
        kernel_size: int,
        stride: int = 1,
        act: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)
        self.norm = norm_layer(ch_out)
        self.act = act if act is not None else nn.Identity()

    def fuse_for_inference(self) -> None:
        """Inference form (models.deploy): the activation works in place (no autograd there; the norm's output
        feeds nothing else). Folding the norm into the conv is models.deploy's generic conv/norm pass."""
        if hasattr(self.act, "inplace"):
            self.act.inplace = True

    def forward(self, x: Tensor) -> Tensor:
        """[B, ch_in, H, W] -> [B, ch_out, H / stride, W / stride]."""
        return self.act(self.norm(self.conv(x)))


def _shortcut(ch_in: int, ch_out: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """Projection shortcut of a stage's first block: avg-pool then 1x1 conv when strided (variant D)."""
    if stride == 1:
        return ConvNormLayer(ch_in, ch_out, 1, 1, norm_layer=norm_layer)
    pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True)
    return nn.Sequential(
        OrderedDict([("pool", pool), ("conv", ConvNormLayer(ch_in, ch_out, 1, 1, norm_layer=norm_layer))])
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34): out = ReLU(branch2b(branch2a(x)) + short(x))."""

    expansion = 1

    def __init__(self, ch_in: int, width: int, stride: int, project: bool, norm_layer: NormLayer):
        super().__init__()
        if project:
            self.short = _shortcut(ch_in, width, stride, norm_layer)
        self.project = project
        self.branch2a = ConvNormLayer(ch_in, width, 3, stride, act=nn.ReLU(inplace=True), norm_layer=norm_layer)
        self.branch2b = ConvNormLayer(width, width, 3, 1, norm_layer=norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, width, H / stride, W / stride]."""
        out = self.branch2b(self.branch2a(x))
        # In place: the sum is a fresh tensor and addition's backward does not read it.
        return F.relu_(out + (self.short(x) if self.project else x))


class BottleNeck(nn.Module):
    """1x1 -> 3x3 (strided, variant D) -> 1x1 (4x width) (ResNet-50/101)."""

    expansion = 4

    def __init__(self, ch_in: int, width: int, stride: int, project: bool, norm_layer: NormLayer):
        super().__init__()
        self.branch2a = ConvNormLayer(ch_in, width, 1, 1, act=nn.ReLU(inplace=True), norm_layer=norm_layer)
        self.branch2b = ConvNormLayer(width, width, 3, stride, act=nn.ReLU(inplace=True), norm_layer=norm_layer)
        self.branch2c = ConvNormLayer(width, width * self.expansion, 1, 1, norm_layer=norm_layer)
        if project:
            self.short = _shortcut(ch_in, width * self.expansion, stride, norm_layer)
        self.project = project

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, 4 width, H / stride, W / stride]."""
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return F.relu_(out + (self.short(x) if self.project else x))


class Blocks(nn.Module):
    """One stage (keys ``blocks.{j}``); its first block projects (and strides unless it is stage 0)."""

    def __init__(self, block: type, ch_in: int, width: int, count: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        layers = []
        for j in range(count):
            layers.append(block(ch_in, width, stride if j == 0 else 1, j == 0, norm_layer))
            ch_in = width * block.expansion
        self.blocks = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """ResNet-vd returning the feature maps of the stages in ``return_idx``.

    Args:
        depth: 18, 34, 50 or 101.
        return_idx: stage indices (0..3, strides 4/8/16/32) whose outputs are returned, in order.
        freeze_at: -1 trains everything; k >= 0 freezes the stem plus the first k stages (requires_grad False).
        freeze_norm: every BatchNorm becomes a FrozenBatchNorm2d (statistics and affine as buffers).
    """

    def __init__(
        self, depth: int = 50, return_idx: Sequence[int] = (1, 2, 3), freeze_at: int = -1, freeze_norm: bool = True
    ):
        super().__init__()
        if depth not in PRESNET_DEPTHS:
            raise ValueError(f"PResNet: depth must be one of {sorted(PRESNET_DEPTHS)}, got {depth}")
        if not return_idx or any(i not in range(4) for i in return_idx):
            raise ValueError(f"PResNet: return_idx must be stage indices in 0..3, got {list(return_idx)}")
        norm_layer: NormLayer = _frozen_bn if freeze_norm else nn.BatchNorm2d
        stem = [("conv1_1", 3, 32, 2), ("conv1_2", 32, 32, 1), ("conv1_3", 32, 64, 1)]
        self.conv1 = nn.Sequential(
            OrderedDict(
                (name, ConvNormLayer(cin, cout, 3, s, act=nn.ReLU(inplace=True), norm_layer=norm_layer))
                for name, cin, cout, s in stem
            )
        )
        block = BottleNeck if depth >= 50 else BasicBlock
        stages, ch_in = [], 64
        for i, (count, width) in enumerate(zip(PRESNET_DEPTHS[depth], _WIDTHS)):
            stages.append(Blocks(block, ch_in, width, count, 1 if i == 0 else 2, norm_layer))
            ch_in = width * block.expansion
        self.res_layers = nn.ModuleList(stages)
        self.return_idx = list(return_idx)
        self.out_channels = [_WIDTHS[i] * block.expansion for i in self.return_idx]
        self.out_strides = [(4, 8, 16, 32)[i] for i in self.return_idx]
        if freeze_at >= 0:
            for module in [self.conv1, *self.res_layers[: min(freeze_at, 4)]]:
                module.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> one [B, C_i, H / s_i, W / s_i] map per returned stage."""
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs


def build_presnet(
    name: str, return_idx: Sequence[int] = (1, 2, 3), freeze_at: int = -1, freeze_norm: bool = True
) -> PResNet:
    """PResNet from a backbone name 'presnet{18,34,50,101}vd'."""
    depths = {f"presnet{d}vd": d for d in PRESNET_DEPTHS}
    if name not in depths:
        raise ValueError(f"unknown PResNet backbone {name!r}; expected one of {sorted(depths)}")
    return PResNet(depths[name], return_idx, freeze_at, freeze_norm)


def load_presnet_weights(backbone: PResNet, path: str | Path) -> None:
    """Load a published ImageNet ``ResNet*_vd*`` file (keys = the backbone's, without prefix) strictly.

    ``num_batches_tracked`` entries may be present or absent on either side (FrozenBatchNorm2d has none);
    every other key must match exactly in name and shape.

    Raises:
        ValueError: the file cannot be read or its keys/shapes differ from the backbone's.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{path}: cannot read the backbone weights ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    own = backbone.state_dict()

    def significant(keys) -> set[str]:
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    missing, unexpected = significant(own) - significant(state), significant(state) - significant(own)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a matching PResNet backbone file: {len(missing)} missing keys (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
    bad = [k for k in significant(own) if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(
            f"{path}: shape mismatch for {len(bad)} keys, e.g. {bad[0]}: "
            f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        )
    filled = {k: state.get(k, v) for k, v in own.items()}
    backbone.load_state_dict(filled, strict=True)
