"""Optimizer parameter groups by role: backbone lr, and weight decay for normalisation layers and biases.

The RT-DETRv2 recipes select groups with regular expressions over parameter names; the same groups follow
from three rules (DESIGN_RTDETR "Training"): every trainable backbone parameter gets ``lr_backbone``; the
parameters of normalisation layers (BatchNorm, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm,
found by module type) get ``norm_weight_decay``; optionally the other biases outside the backbone get
``bias_weight_decay`` (the r34 recipe). Roles with equal (lr, weight decay) share one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

# Group order (published r50: backbone, then norms, then the rest; r34 also has the backbone norms second).
ROLES = ("backbone", "backbone_norm", "norm", "bias", "other")


def parameter_roles(model: nn.Module, backbone_prefix: str | Sequence[str] = "backbone") -> dict[str, str]:
    """Role of every trainable parameter, by name in ``model.named_parameters()`` order.

    Args:
        model: the detector (unwrap DDP first).
        backbone_prefix: name prefix(es) of the backbone's parameters, matched at a '.' boundary.

    Returns:
        {name: role} with role one of 'backbone', 'backbone_norm', 'norm' (normalisation layer outside the
        backbone), 'bias' (a parameter whose own name contains 'bias', e.g. ``in_proj_bias``, outside the
        backbone and not in a norm layer), 'other'. Frozen parameters are left out; a parameter shared by
        several modules appears once, under its first name.
    """
    prefixes = (backbone_prefix,) if isinstance(backbone_prefix, str) else tuple(backbone_prefix)
    norm_params = {
        id(p) for module in model.modules() if isinstance(module, NORM_TYPES) for p in module.parameters(recurse=False)
    }
    roles = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes)
        is_norm = id(param) in norm_params
        if in_backbone:
            roles[name] = "backbone_norm" if is_norm else "backbone"
        elif is_norm:
            roles[name] = "norm"
        elif "bias" in name.rsplit(".", 1)[-1]:
            roles[name] = "bias"
        else:
            roles[name] = "other"
    return roles


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    lr_backbone: float,
    weight_decay: float,
    norm_weight_decay: float | None = 0.0,
    bias_weight_decay: float | None = None,
    backbone_prefix: str | Sequence[str] = "backbone",
) -> list[dict[str, Any]]:
    """AdamW parameter groups ``[{'params', 'lr', 'weight_decay'}, ...]`` by the rules of the module docstring.

    Args:
        model: the detector (unwrap DDP first); only parameters with ``requires_grad`` are grouped.
        lr: lr of everything outside the backbone.
        lr_backbone: lr of every trainable backbone parameter (its norms included).
        weight_decay: the default weight decay.
        norm_weight_decay: weight decay of normalisation-layer parameters; None = ``weight_decay``.
        bias_weight_decay: weight decay of biases outside the backbone and the norms; None = ``weight_decay``.
        backbone_prefix: name prefix(es) of the backbone parameters.

    Returns:
        Non-empty groups in role order (backbone, backbone norms, norms, biases, rest); roles with the same
        (lr, weight decay) are merged into the first one's group.
    """
    if lr < 0 or lr_backbone < 0:
        raise ValueError(f"learning rates must be >= 0, got lr={lr}, lr_backbone={lr_backbone}")
    norm_wd = weight_decay if norm_weight_decay is None else norm_weight_decay
    bias_wd = weight_decay if bias_weight_decay is None else bias_weight_decay
    settings = {
        "backbone": (lr_backbone, weight_decay),
        "backbone_norm": (lr_backbone, norm_wd),
        "norm": (lr, norm_wd),
        "bias": (lr, bias_wd),
        "other": (lr, weight_decay),
    }
    params = dict(model.named_parameters())
    by_role: dict[str, list] = {role: [] for role in ROLES}
    for name, role in parameter_roles(model, backbone_prefix).items():
        by_role[role].append(params[name])
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for role in ROLES:
        if not by_role[role]:
            continue
        group_lr, group_wd = settings[role]
        group = groups.setdefault((group_lr, group_wd), {"params": [], "lr": group_lr, "weight_decay": group_wd})
        group["params"].extend(by_role[role])
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())
