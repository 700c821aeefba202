"""The backbones by name (``build_backbone``: torchvision ResNets, the published Swin variants, ``timm:NAME``),
the ResNet with frozen batch norm, and the Joiner that adds position encodings.

Module names are part of the checkpoint contract: the Joiner is a two-element ``nn.Sequential`` so the
ResNet lives under ``backbone.0.body.<torchvision resnet names>``, a Swin directly under ``backbone.0.<published
Swin names>`` (``models.swin_transformer``), a timm model under ``backbone.0.body.<timm names>``
(``models.timm_backbone``), and a learned position encoding under ``backbone.1``. Every backbone parameter is
under ``backbone.0``, the published backbone lr group.
"""

from __future__ import annotations

import functools
import math
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from util.misc import NestedTensor

from .feature_maps import FrozenBatchNorm2d, downsample_mask_nearest
from .position_encoding import build_position_encoding
from .state_dict import read_weights_file
from .swin_transformer import SWIN_CONFIGS, build_swin_backbone
from .timm_backbone import TIMM_PREFIX, build_timm_backbone, parse_timm_name

if TYPE_CHECKING:
    from .settings import DetectorSettings

__all__ = [
    "Backbone",
    "BackboneBase",
    "FrozenBatchNorm2d",
    "Joiner",
    "WeightsUnavailableError",
    "backbone_choices",
    "backbone_levels_of",
    "backbone_of",
    "build_backbone",
    "check_backbone_name",
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
    return read_weights_file(path, f"'imagenet', 'none' or a {name} .pth state dict", ("module.", "backbone.0.body."))


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
            out[key] = NestedTensor(feature, downsample_mask_nearest(mask, feature.shape[-2:]))
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
    """``Joiner(backbone, position_embedding)``: features and their position encodings, lowest stride first.

    ``num_channels``: channels of the last returned level (the map DETR's input projection reads).
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.stage_channels[-1]

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        """Returns (features: list of NestedTensor [B, C_i, H_i, W_i], positions: list of [B, D, H_i, W_i])."""
        features = list(self[0](tensor_list).values())
        positions = [self[1](feature).to(feature.tensors.dtype) for feature in features]
        return features, positions


def backbone_choices() -> str:
    """The accepted ``--backbone`` values, for messages and help."""
    return ", ".join([*_STAGE_CHANNELS, *SWIN_CONFIGS, f"{TIMM_PREFIX}NAME (any timm features_only model)"])


def _feature_extractor(
    settings: DetectorSettings, return_interm_layers: bool, return_interm_indices: Sequence[int] | None
) -> nn.Module:
    """``backbone.0``: the ResNet, Swin or timm model of ``settings.backbone`` returning the asked stages."""
    name = settings.backbone
    train = settings.lr_backbone > 0
    if name in _STAGE_CHANNELS:
        if settings.use_checkpoint:
            raise ValueError(f"--use_checkpoint is for the Swin and timm backbones; drop it with --backbone {name}")
        return Backbone(
            name, train_backbone=train, return_interm_layers=return_interm_layers, dilation=settings.dilation,
            weights=settings.backbone_weights, stages=settings.backbone_stages,
            return_interm_indices=return_interm_indices,
        )  # fmt: skip
    if name not in SWIN_CONFIGS and parse_timm_name(name) is None:
        raise ValueError(f"--backbone {name}: unknown; choose one of {backbone_choices()}")
    for flag, given in (("--dilation", settings.dilation), ("--backbone_stages", settings.backbone_stages != 4)):
        if given:
            raise ValueError(f"{flag} is for the ResNet backbones only; drop it with --backbone {name}")
    for_mask_head = return_interm_layers and return_interm_indices is None
    if return_interm_indices is None:  # DETR: the last stage, or all four for its mask head
        return_interm_indices = range(4) if return_interm_layers else [3]
    indices = sorted(return_interm_indices)
    if name in SWIN_CONFIGS:
        extractor = build_swin_backbone(name, indices, settings.use_checkpoint, settings.backbone_weights, train)
    else:
        extractor = build_timm_backbone(
            name, indices, settings.backbone_weights, freeze_bn=True, train_backbone=train,
            use_checkpoint=settings.use_checkpoint,
        )  # fmt: skip
    channels = extractor.stage_channels
    if for_mask_head and any(c * 2 ** (len(channels) - 1 - i) != channels[-1] for i, c in enumerate(channels)):
        # The mask head's adapters take 1/2, 1/4, 1/8 of the last level's channels (ResNet and Swin layout).
        raise ValueError(f"--masks needs stage channels that halve level by level; --backbone {name} has {channels}")
    return extractor


def build_backbone(
    settings: DetectorSettings,
    return_interm_layers: bool = False,
    return_interm_indices: Sequence[int] | None = None,
    **position: float | None,
) -> Joiner:
    """The backbone named by ``settings.backbone`` (a torchvision ResNet, a published Swin, ``timm:NAME``) with
    the settings' weights, dilation, stages, lr_backbone and use_checkpoint, plus the position encoding.

    Args:
        settings: the family's settings.
        return_interm_layers: all four stages (DETR's mask head) instead of the last one.
        return_interm_indices: the stages to return, 0 = stride 4 ... 3 = stride 32 (multi-scale families).
        **position: the family's sine-encoding choices (``build_position_encoding``'s scale, offset, temperature,
            temperature_w).

    Raises:
        ValueError: an unknown name (one line listing the choices) or a flag the backbone does not take.
    """
    backbone = _feature_extractor(settings, return_interm_layers, return_interm_indices)
    return Joiner(backbone, build_position_encoding(settings.position_embedding, settings.hidden_dim, **position))


def resnet_of(state: Mapping[str, Tensor], prefix: str = "") -> str | None:
    """The torchvision ResNet whose keys ``{prefix}backbone.0.body.*`` a state dict has (None when unknown)."""
    body = f"{prefix}backbone.0.body."
    bottleneck = f"{body}layer1.0.conv3.weight" in state
    layer3 = f"{body}layer3."
    layer3_blocks = len({k[len(layer3) :].split(".")[0] for k in state if k.startswith(layer3)})
    backbones = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    return backbones.get((bottleneck, layer3_blocks))


def _swin_of(state: Mapping[str, Tensor], prefix: str = "") -> str | None:
    """The published Swin (``SWIN_CONFIGS``) whose keys ``{prefix}backbone.0.patch_embed...`` a state dict has:
    embedding width and patch size, blocks and heads per stage, window (from the bias table's rows)."""
    swin = f"{prefix}backbone.0."
    embed = state.get(f"{swin}patch_embed.proj.weight")
    if embed is None:
        return None
    depths, heads, windows = [], [], set()
    while any(k.startswith(f"{swin}layers.{len(depths)}.") for k in state):
        blocks = f"{swin}layers.{len(depths)}.blocks."
        depths.append(len({k[len(blocks) :].split(".")[0] for k in state if k.startswith(blocks)}))
        table = state.get(f"{blocks}0.attn.relative_position_bias_table")
        if table is None:
            return None
        heads.append(table.shape[1])
        windows.add((math.isqrt(table.shape[0]) + 1) // 2)  # (2w - 1)^2 rows
    for name, config in SWIN_CONFIGS.items():
        if (config.embed_dim, config.patch_size, tuple(depths), tuple(heads), {config.window_size}) == (
            embed.shape[0], embed.shape[-1], config.depths, config.num_heads, windows,
        ):  # fmt: skip
            return name
    return None


def backbone_of(state: Mapping[str, Tensor], prefix: str = "") -> str | None:
    """The ``--backbone`` a state dict's ``{prefix}backbone.0.*`` keys tell: a torchvision ResNet or a published
    Swin; None when they do not tell (a timm model: its name comes only from a checkpoint's stored args)."""
    return resnet_of(state, prefix) or _swin_of(state, prefix)


def backbone_levels_of(state: Mapping[str, Tensor], prefix: str = "") -> list[int] | None:
    """The stages (0 = stride 4) a Swin state dict returns, from its output norms ``backbone.0.norm{i}``; None for
    other backbones (their keys do not say)."""
    if _swin_of(state, prefix) is None:
        return None
    return [i for i in range(4) if f"{prefix}backbone.0.norm{i}.weight" in state]


def check_backbone_name(state: Mapping[str, Tensor], backbone: str, prefix: str = "") -> None:
    """Raise a one-line ValueError when ``state`` holds a timm backbone (``backbone.0.body.*`` keys of no torchvision
    ResNet) but ``backbone`` is no ``timm:NAME``: the keys do not tell the timm model, the stored args must."""
    body = f"{prefix}backbone.0.body."
    keys = [k for k in state if k.startswith(body)]
    resnet_like = f"{body}conv1.weight" in state and f"{body}layer1.0.conv1.weight" in state  # also truncated ones
    if keys and not resnet_like and parse_timm_name(backbone) is None:
        raise ValueError(
            f"the checkpoint's backbone is a timm model (keys {keys[0]}, ...) whose name its weights do not tell, and "
            f"its stored args name none (--backbone {backbone}): pass the checkpoint with its 'args' "
            "(backbone='timm:NAME') or give --backbone timm:NAME"
        )


# The name the multi-scale parts and older tests import.
_downsample_mask_nearest = downsample_mask_nearest
