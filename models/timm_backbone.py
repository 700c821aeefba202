"""Any timm ``features_only`` model as a DETR-family backbone (``--backbone timm:NAME``).

The timm model lives under ``body`` (``backbone.0.body.<timm features-model keys>``, like the ResNet), so the
published lr groups (names containing ``backbone.0``) cover it. Levels are chosen by stride: level i of
``return_interm_indices`` is the deepest timm feature map at stride ``4 * 2**i`` (0 = stride 4 ... 3 = stride 32),
whatever index the model's ``feature_info`` gives it (timm ResNets list their stride-2 stem first, ConvNeXts do
not). timm is optional: importing this module works without it; building a backbone says how to install it.
Weights come only from a local file; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from util.misc import NestedTensor

from .feature_maps import FrozenBatchNorm2d, downsample_mask_nearest
from .state_dict import read_weights_file

__all__ = ["TimmBackbone", "build_timm_backbone", "freeze_batch_norm", "import_timm", "parse_timm_name"]

TIMM_PREFIX = "timm:"


def import_timm() -> Any:
    """The timm module, or a one-line ImportError saying how to get it."""
    try:
        import timm
    except ImportError:
        raise ImportError("--backbone timm:NAME needs timm: pip install timm") from None
    return timm


def parse_timm_name(backbone: str) -> str | None:
    """'timm:NAME' -> 'NAME'; any other backbone name -> None."""
    if not backbone.startswith(TIMM_PREFIX):
        return None
    name = backbone[len(TIMM_PREFIX) :]
    if not name:
        raise ValueError(f"--backbone {backbone}: give a timm model name after 'timm:', e.g. timm:convnext_tiny")
    return name


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Frozen replacement of timm's ``BatchNormAct2d``: the frozen affine, then its dropout and activation."""

    def __init__(self, num_features: int, eps: float, drop: nn.Module, act: nn.Module):
        super().__init__(num_features, eps=eps)
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (and timm's BatchNormAct2d, SyncBatchNorm) in ``module`` by a FrozenBatchNorm2d
    holding its statistics and affine as buffers, in place; returns ``module`` (or its replacement if it is a BN)."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if hasattr(module, "act") and hasattr(module, "drop"):  # timm's BatchNormAct2d
            frozen = FrozenBatchNormAct2d(module.num_features, module.eps, module.drop, module.act)
        else:
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for child_name, child in module.named_children():
        new_child = freeze_batch_norm(child)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module


def _read_state_dict(path: str, name: str) -> dict[str, Tensor]:
    """A timm model's state dict from a local .pth / .bin / .safetensors file (bare, {'model': ...} or
    {'state_dict': ...}; a DDP ``module.`` prefix is removed)."""
    return read_weights_file(path, f"'none' or a timm {name} state dict")


def _check_state_dict(state: dict[str, Tensor], full_model: nn.Module, path: str, name: str) -> None:
    """Every key of the timm classification model ``name`` must be in the file with its shape, except its
    classifier (the features model drops it); no other keys may be present."""
    expected = full_model.state_dict()
    classifier = full_model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    optional = {k for k in expected if any(k.startswith(c + ".") for c in classifier)}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        more = ["..." if len(keys) > 3 else "" for keys in (missing, unexpected)]
        raise ValueError(
            f"--backbone_weights {path}: not a timm {name} state dict (missing {missing[:3]}{more[0]}, "
            f"unexpected {unexpected[:3]}{more[1]}, shapes {wrong[:1]})"
        )


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model with the BackboneBase contract.

    Attributes:
        body: the timm features model.
        num_channels / stage_channels: channels of each returned level (from timm's ``feature_info``).
        strides: stride of each returned level.
    """

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.num_channels = list(body.feature_info.channels())
        self.stage_channels = list(self.num_channels)
        self.strides = list(body.feature_info.reduction())

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        """[B, 3, H, W] images + [B, H, W] mask -> {'0'..: NestedTensor([B, C_i, H_i, W_i], [B, H_i, W_i])}."""
        images, mask = tensor_list.tensors, tensor_list.mask
        if mask is None:
            mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
        features = self.body(images)
        if isinstance(features, dict):
            features = list(features.values())
        return {
            str(k): NestedTensor(feature, downsample_mask_nearest(mask, feature.shape[-2:]))
            for k, feature in enumerate(features)
        }


def build_timm_backbone(
    name: str,
    return_interm_indices: Sequence[int] = (1, 2, 3),
    weights: str = "none",
    freeze_bn: bool = True,
    train_backbone: bool = True,
    use_checkpoint: bool = False,
) -> TimmBackbone:
    """``timm.create_model(name, features_only=True, out_indices=...)`` for the levels at strides
    ``4 * 2**i`` (i in ``return_interm_indices``), with frozen batch norm and optional local weights.

    Args:
        name: a timm model name ('timm:' prefix allowed).
        weights: 'none' (random) or a local state-dict file of the timm classification model ``name``
            (strict: only its classifier may be absent). 'imagenet' is refused: nothing is downloaded.
        freeze_bn: replace batch norm by FrozenBatchNorm2d (as for the ResNets); False keeps trainable BN.
        train_backbone: if False every parameter is frozen (``--lr_backbone 0``).
        use_checkpoint: activation checkpointing (timm's ``set_grad_checkpointing``) while gradients are on.
    """
    name = parse_timm_name(name) or name
    timm = import_timm()
    if weights == "imagenet":
        raise ValueError(
            f"--backbone_weights imagenet: timm weights are not downloaded; pass a local file "
            f"(the timm {name} state dict, e.g. model.safetensors) or none"
        )
    try:
        with torch.device("meta"):  # structure only: no memory, no initialisation cost
            full_model = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise ValueError(f"--backbone timm:{name}: unknown timm model (see timm.list_models())") from None
    reductions = [info["reduction"] for info in full_model.feature_info]
    out_indices = []
    for level in sorted(return_interm_indices):
        stride = 4 * 2**level
        if level < 0 or stride not in reductions:
            raise ValueError(
                f"--return_interm_indices {list(return_interm_indices)}: timm {name} has no stride-"
                f"{stride} feature map (its strides: {sorted(set(reductions))})"
            )
        out_indices.append(len(reductions) - 1 - reductions[::-1].index(stride))
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": tuple(out_indices)}
    if weights != "none":
        state = _read_state_dict(weights, name)
        _check_state_dict(state, full_model, weights, name)
        # timm loads the dict into the classification model before cutting it down to the features model; every
        # other weight source is blanked so that nothing can be fetched.
        overlay = {"state_dict": state, "file": None, "url": None, "hf_hub_id": None, "source": ""}
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    body = timm.create_model(name, **kwargs)
    if use_checkpoint:
        if not hasattr(body, "set_grad_checkpointing"):
            raise ValueError(f"--use_checkpoint: the timm {name} features model has no activation checkpointing")
        body.set_grad_checkpointing(True)
    if freeze_bn:
        body = freeze_batch_norm(body)
    body.requires_grad_(train_backbone)
    return TimmBackbone(body)
