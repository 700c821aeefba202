"""ResNet backbone with frozen batch norm, and the Joiner that adds position encodings.

Module names are part of the checkpoint contract: the Joiner is a two-element ``nn.Sequential`` so the
ResNet lives under ``backbone.0.body.<torchvision resnet names>`` and a learned position encoding under
``backbone.1``.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision import ops
from torchvision.models._utils import IntermediateLayerGetter

from util.misc import NestedTensor

from .position_encoding import build_position_encoding

if TYPE_CHECKING:
    from .settings import DetectorSettings

__all__ = [
    "Backbone",
    "BackboneBase",
    "FrozenBatchNorm2d",
    "Joiner",
    "WeightsUnavailableError",
    "build_backbone",
    "load_backbone_weights",
    "resnet_of",
]

# Output channels of layer1..layer4.
_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
# The published models were trained from torchvision's original ImageNet weights (``pretrained=True``).
_IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
}
# Per-socket-operation timeout for the ImageNet download: offline machines must fail fast, not hang.
DOWNLOAD_TIMEOUT_S = 15.0


class WeightsUnavailableError(RuntimeError):
    """The ImageNet backbone weights can be neither found in the torch hub cache nor downloaded."""


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """Torchvision ImageNet weights of ``name``: from the torch hub cache, else downloaded (fails fast)."""
    url = _IMAGENET_WEIGHTS[name].url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if os.path.isfile(cached):
        return torch.load(cached, map_location="cpu", weights_only=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except Exception as err:  # any network/hash/disk failure gets the same actionable message
        reason = " ".join(str(err).split()) or type(err).__name__
        raise WeightsUnavailableError(
            f"--backbone_weights imagenet: cannot get the {name} ImageNet weights ({url}: {reason}); "
            f"pass --backbone_weights none (random init) or --backbone_weights PATH (a local {name} .pth), "
            f"or put the file in {os.path.dirname(cached)}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _file_state_dict(path: str, name: str) -> dict[str, Tensor]:
    """A torchvision ResNet state dict from ``path`` (also accepts {'model': ...} and DETR-prefixed keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--backbone_weights {path}: no such file; expected 'imagenet', 'none' or a {name} .pth state dict"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"--backbone_weights {path}: expected a state dict, got {type(state).__name__}")
    for prefix in ("module.", "backbone.0.body."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_backbone_weights(resnet: nn.Module, weights: str, name: str) -> None:
    """Load ``weights`` ('imagenet', 'none' or a .pth path) into a torchvision ResNet in place.

    The classifier (``fc.*``) is optional since DETR drops it; any other missing or unexpected key is an error.
    """
    if weights == "none":
        return
    state = _imagenet_state_dict(name) if weights == "imagenet" else _file_state_dict(weights, name)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"--backbone_weights {weights}: not a {name} state dict "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers and float32 numbers) that keeps the input's dtype.

    Under bf16/fp16 autocast the float32 buffers would otherwise promote every activation back to float32,
    about a fifth of an R50 step on CPU: the affine is folded in float32 and applied in the input's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


def _stage_out_channels(stage: nn.Sequential) -> int:
    """Output channels of a torchvision ResNet stage (its last block's last convolution)."""
    last_block = stage[-1]
    last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
    return last_conv.out_channels


class BackboneBase(nn.Module):
    """Feature maps of some of a ResNet's stages, each with its padding mask (the published base class).

    Args:
        backbone: a torchvision ResNet (modules ``layer1``..``layer4``; later stages than the last returned one
            are dropped).
        train_backbone: if False every parameter is frozen; if True layer2-4 train (stem and layer1 never do).
        num_channels: channels of the last feature map (the one DETR's input projection reads).
        return_interm_layers: return layer1..layer4 (for the mask head) instead of layer4 only.
        return_interm_indices: the stages to return, 0 = layer1; overrides ``return_interm_layers``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        train_backbone: bool,
        num_channels: int,
        return_interm_layers: bool,
        return_interm_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        for param_name, param in backbone.named_parameters():
            trainable = train_backbone and param_name.split(".")[0] in ("layer2", "layer3", "layer4")
            param.requires_grad_(trainable)
        if return_interm_indices is None:
            return_interm_indices = range(4) if return_interm_layers else [3]
        indices = sorted(return_interm_indices)
        # The getter drops every module after the last returned stage.
        self.body = IntermediateLayerGetter(
            backbone, return_layers={f"layer{i + 1}": str(k) for k, i in enumerate(indices)}
        )
        # Channels per returned feature map.
        self.stage_channels = [_stage_out_channels(getattr(backbone, f"layer{i + 1}")) for i in indices]
        self.num_channels = num_channels

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        """[B, 3, H, W] images + [B, H, W] padding mask -> {'0'..: NestedTensor([B, C_i, H_i, W_i], [B, H_i, W_i])}."""
        images = tensor_list.tensors
        mask = tensor_list.mask
        if mask is None:
            mask = torch.zeros((images.shape[0], images.shape[-2], images.shape[-1]), dtype=torch.bool,
                               device=images.device)  # fmt: skip
        out: dict[str, NestedTensor] = {}
        for key, feature in self.body(images).items():
            out[key] = NestedTensor(feature, _downsample_mask_nearest(mask, feature.shape[-2:]))
        return out


class Backbone(BackboneBase):
    """Torchvision ResNet feature extractor with FrozenBatchNorm2d.

    Args:
        name: 'resnet18', 'resnet34', 'resnet50' or 'resnet101'.
        train_backbone: if False every parameter is frozen; if True layer2-4 train (stem and layer1 never do).
        return_interm_layers: return layer1..layer4 (for the mask head) instead of layer4 only.
        dilation: dilate the last kept stage instead of striding it (DC5: output stride 16).
        weights: 'imagenet', 'none' or a path to a torchvision ResNet state dict.
        stages: ResNet stages kept: 4 (published, C5 at stride 32), 3 (C4, stride 16) or 2 (C3, stride 8).
            Later stages are dropped with their weights; shallower features are cheaper and, from random
            weights, localise better.
        return_interm_indices: the stages to return, 0 = layer1 (Deformable DETR / DINO feature levels, e.g.
            (1, 2, 3) for strides 8/16/32); overrides ``return_interm_layers``.
    """

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        return_interm_layers: bool,
        dilation: bool,
        weights: str = "imagenet",
        stages: int = 4,
        return_interm_indices: Sequence[int] | None = None,
    ):
        if name not in _STAGE_CHANNELS:
            raise ValueError(f"--backbone {name}: unsupported; choose one of {sorted(_STAGE_CHANNELS)}")
        if stages not in (2, 3, 4):
            raise ValueError(f"--backbone_stages {stages}: choose 2, 3 or 4")
        if return_interm_layers and stages != 4 and return_interm_indices is None:  # --masks: layer1..layer4
            raise ValueError(f"--masks needs all four ResNet stages; got --backbone_stages {stages}")
        if return_interm_indices is None:
            return_interm_indices = range(4) if return_interm_layers else [stages - 1]
        indices = sorted(return_interm_indices)
        if not indices or indices[0] < 0 or indices[-1] >= stages:
            raise ValueError(f"--return_interm_indices {list(return_interm_indices)}: stages 0..{stages - 1} exist")
        basic_blocks = name in ("resnet18", "resnet34")  # torchvision cannot dilate BasicBlock stages itself
        dilate = [dilation and not basic_blocks and stage == stages for stage in (2, 3, 4)]
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=dilate,
            norm_layer=functools.partial(FrozenBatchNorm2d, eps=1e-5),
        )
        if dilation and basic_blocks:
            _dilate_basic_stage(getattr(resnet, f"layer{stages}"))
        load_backbone_weights(resnet, weights, name)
        super().__init__(resnet, train_backbone, _STAGE_CHANNELS[name][stages - 1], return_interm_layers, indices)


def _dilate_basic_stage(stage: nn.Sequential) -> None:
    """Replace the stride of a BasicBlock stage by dilation (the "a trous" trick torchvision applies to
    Bottleneck stages): the first block loses its stride and every 3x3 convolution after it gets dilation 2,
    so the output at even positions equals the strided stage's output. Same parameters and state-dict keys.
    """
    first = stage[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    convs = [first.conv2] + [conv for block in list(stage)[1:] for conv in (block.conv1, block.conv2)]
    for conv in convs:
        conv.dilation, conv.padding = (2, 2), (2, 2)


class Joiner(nn.Sequential):
    """``Joiner(backbone, position_embedding)``: features and their position encodings, lowest stride first."""

    def __init__(self, backbone: BackboneBase, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        """Returns (features: list of NestedTensor [B, C_i, H_i, W_i], positions: list of [B, D, H_i, W_i])."""
        features = list(self[0](tensor_list).values())
        positions = [self[1](feature).to(feature.tensors.dtype) for feature in features]
        return features, positions


def build_backbone(
    settings: DetectorSettings,
    return_interm_layers: bool = False,
    return_interm_indices: Sequence[int] | None = None,
    **position: float | None,
) -> Joiner:
    """Backbone (settings' backbone, dilation, lr_backbone, backbone_weights, backbone_stages) + position encoding.

    Args:
        settings: the family's settings.
        return_interm_layers: all four stages (DETR's mask head) instead of the last one.
        return_interm_indices: the stages to return, 0 = layer1 (multi-scale families).
        **position: the family's sine-encoding choices (``build_position_encoding``'s scale, offset, temperature,
            temperature_w).
    """
    backbone = Backbone(
        settings.backbone,
        train_backbone=settings.lr_backbone > 0,
        return_interm_layers=return_interm_layers,
        dilation=settings.dilation,
        weights=settings.backbone_weights,
        stages=settings.backbone_stages,
        return_interm_indices=return_interm_indices,
    )
    return Joiner(backbone, build_position_encoding(settings.position_embedding, settings.hidden_dim, **position))


def resnet_of(state: Mapping[str, Tensor], prefix: str = "") -> str | None:
    """The torchvision ResNet whose keys ``{prefix}backbone.0.body.*`` a state dict has (None when unknown)."""
    body = f"{prefix}backbone.0.body."
    bottleneck = f"{body}layer1.0.conv3.weight" in state
    layer3 = f"{body}layer3."
    layer3_blocks = len({k[len(layer3) :].split(".")[0] for k in state if k.startswith(layer3)})
    backbones = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    return backbones.get((bottleneck, layer3_blocks))


def _downsample_mask_nearest(mask: Tensor, size: list[int]) -> Tensor:
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
