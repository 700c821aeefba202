"""Inference-only copies of a detector: conv + batch-norm folding, re-parameterised blocks, channels_last.

``prepare_for_inference(model)`` returns an eval-mode deep copy in which

* every ``Conv2d`` whose output goes straight into a ``BatchNorm2d`` / ``FrozenBatchNorm2d`` becomes one biased
  convolution (the norm becomes ``nn.Identity``). In eval mode a batch norm is the per-channel affine
  ``y = (x - mean) * g / sqrt(var + eps) + b``, so it folds into the convolution's weights and bias;
* every module with a ``fuse_for_inference()`` method gets it called first (e.g. RT-DETR's RepVggBlock merges its
  two convolution branches into one 3x3 convolution);
* the 4-D parameters and buffers are stored channels_last (optional). The caller need not convert the images:
  PyTorch's convolutions return channels_last outputs when either the input or the weight is channels_last, so the
  first convolution switches the layout.

Pairs are recognised by the module names the model families use, which all apply the norm right after the
convolution in their forward (tests/test_deploy.py and tests/test_rtdetrv2_deploy.py check the outputs):
children ``conv`` + ``norm`` of one module (ConvNormLayer, input projections), torchvision ResNet's ``convK`` +
``bnK``, and consecutive children of an ``nn.Sequential`` (torchvision's ``downsample``). The source model, its
state_dict and its training behaviour are untouched; the copy is for inference only (no batch norm is left to
train).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision import ops

from models.feature_maps import FrozenBatchNorm2d

__all__ = ["conv_norm_pairs", "fold_conv_norm", "fold_conv_norms_", "prepare_for_inference"]

# Exact types only: a subclass may add behaviour after the affine (timm's BatchNormAct2d adds an activation).
_FOLDABLE_NORMS = (nn.BatchNorm2d, ops.FrozenBatchNorm2d, FrozenBatchNorm2d)
_CONV_BN_NAME = re.compile(r"conv(\d+)$")


def _is_foldable_norm(module: nn.Module) -> bool:
    if type(module) not in _FOLDABLE_NORMS:
        return False
    # A BatchNorm2d without running statistics normalises with the batch's own even in eval mode.
    return getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None


def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight [C_out, C_in / groups, kh, kw] and bias [C_out] of ``norm(conv(x))`` as one convolution.

    Args:
        conv: the convolution (with or without bias).
        norm: BatchNorm2d / FrozenBatchNorm2d with running statistics (eval-mode semantics), or nn.Identity
            (already folded: the convolution's own weight and bias, zeros when it has none).
    """
    bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
    if isinstance(norm, nn.Identity):
        return conv.weight.detach().clone(), bias.detach().clone()
    if not _is_foldable_norm(norm):
        raise ValueError(f"fold_conv_norm: cannot fold a {type(norm).__name__} into a convolution")
    if norm.running_mean.shape[0] != conv.out_channels:
        raise ValueError(
            f"fold_conv_norm: norm has {norm.running_mean.shape[0]} channels, conv {conv.out_channels} outputs"
        )
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(
            conv.weight, bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
    return weight.detach(), bias.detach()


def conv_norm_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, conv child name, norm child name) of every recognised conv -> norm pair (see the module doc)."""
    for parent in model.modules():
        children = dict(parent.named_children())
        found: list[tuple[str, str]] = []
        if "conv" in children and "norm" in children:
            found.append(("conv", "norm"))
        for name in children:
            match = _CONV_BN_NAME.fullmatch(name)
            if match and f"bn{match.group(1)}" in children:
                found.append((name, f"bn{match.group(1)}"))
        if isinstance(parent, nn.Sequential):
            names = list(children)
            found.extend(zip(names[:-1], names[1:]))
        seen = set()
        for conv_name, norm_name in found:
            if conv_name in seen:
                continue
            if type(children[conv_name]) is nn.Conv2d and _is_foldable_norm(children[norm_name]):
                seen.add(conv_name)
                yield parent, conv_name, norm_name


@torch.no_grad()
def fold_conv_norms_(model: nn.Module) -> int:
    """Fold every recognised conv -> norm pair of ``model`` in place; returns how many were folded.

    The folded convolution keeps its settings (stride, padding, groups, ...) and gains a bias; the norm becomes
    nn.Identity. Only valid for inference: the model must not be trained afterwards.
    """
    pairs = list(conv_norm_pairs(model))
    for parent, conv_name, norm_name in pairs:
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        weight, bias = fold_conv_norm(conv, norm)
        fused = copy.deepcopy(conv)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        fused.bias = nn.Parameter(bias, requires_grad=False)
        setattr(parent, conv_name, fused)
        setattr(parent, norm_name, nn.Identity())
    return len(pairs)


def prepare_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Eval-mode deep copy of ``model`` with re-parameterised blocks and folded conv + norm pairs.

    Args:
        model: any detector of this project (the source is not modified).
        channels_last: store the copy's 4-D weights channels_last (faster convolutions and pooling on CPU with
            oneDNN); inputs may stay contiguous NCHW, the first convolution switches the layout.

    Returns:
        The prepared copy, in eval mode, without gradients. Its ``folded_conv_norms`` attribute counts the folded
        pairs (re-parameterised blocks fold their own branches and are not counted).
    """
    prepared = copy.deepcopy(model).eval()
    prepared.requires_grad_(False)
    with torch.no_grad():
        for module in list(prepared.modules()):
            fuse = getattr(module, "fuse_for_inference", None)
            if callable(fuse):
                fuse()
        count = fold_conv_norms_(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    prepared.folded_conv_norms = count
    return prepared
