"""build_param_groups: hand counts on a small detector-shaped module and equality with the published regexes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from run.param_groups import build_param_groups, parameter_roles


class _ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, bias=False)
        self.norm = nn.BatchNorm2d(cout)


class _Tiny(nn.Module):
    """backbone: stem (frozen) + 2 ConvNorm; encoder: ConvNorm, MHA, 2 LayerNorms; decoder: Linear, LN, query."""

    def __init__(self, freeze_backbone_norm: bool = False):
        super().__init__()
        self.backbone = nn.ModuleDict({"stem": _ConvNorm(3, 4), "layer1": _ConvNorm(4, 4), "layer2": _ConvNorm(4, 4)})
        self.backbone["stem"].requires_grad_(False)
        if freeze_backbone_norm:
            for name in ("layer1", "layer2"):
                self.backbone[name].norm.requires_grad_(False)
        self.encoder = nn.ModuleDict(
            {
                "proj": _ConvNorm(4, 8),
                "attn": nn.MultiheadAttention(8, 2),
                "norm1": nn.LayerNorm(8),
                "norm2": nn.LayerNorm(8),
            }
        )
        self.decoder = nn.ModuleDict({"linear": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})
        self.decoder.query = nn.Parameter(torch.zeros(3, 8))


def _published_r50(name: str):
    if re.match(r"^(?=.*backbone)(?!.*norm).*$", name):
        return "lr_backbone", "wd"
    if re.match(r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", name):
        return "lr", 0.0
    return "lr", "wd"


def _published_r34(name: str):
    if re.match(r"^(?=.*backbone)(?!.*norm|bn).*$", name):
        return "lr_backbone", "wd"
    if re.match(r"^(?=.*backbone)(?=.*norm|bn).*$", name):
        return "lr_backbone", 0.0
    if re.match(r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", name):
        return "lr", 0.0
    return "lr", "wd"


def _setting_by_name(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    owner = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: owner[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_hand_counts_r50_rules():
    model = _Tiny(freeze_backbone_norm=True)
    groups = build_param_groups(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, norm_weight_decay=0.0)
    # backbone: layer1/layer2 conv weights (stem frozen, norms frozen) = 2;
    # norms: encoder BN 2 + norm1/norm2 4 + decoder LN 2 = 8;
    # rest: encoder conv 1 + MHA in_proj w/b + out_proj w/b 4 + decoder linear 2 + query 1 = 8.
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (2, 1e-5, 1e-4),
        (8, 1e-4, 0.0),
        (8, 1e-4, 1e-4),
    ]
    params = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params) == sum(p.requires_grad for p in model.parameters())


def test_hand_counts_r34_rules_with_bias_decay():
    model = _Tiny()
    groups = build_param_groups(
        model, lr=1e-4, lr_backbone=5e-5, weight_decay=1e-4, norm_weight_decay=0.0, bias_weight_decay=0.0
    )
    # backbone convs 2; backbone BN 4; enc/dec norms 8 + biases (in_proj_bias, out_proj.bias, linear.bias) 3;
    # rest: encoder conv, in_proj_weight, out_proj.weight, linear.weight, query = 5.
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (2, 5e-5, 1e-4),
        (4, 5e-5, 0.0),
        (11, 1e-4, 0.0),
        (5, 1e-4, 1e-4),
    ]


@pytest.mark.parametrize("recipe", ["r50", "r34"])
def test_equals_published_regex_groups(recipe):
    model = _Tiny(freeze_backbone_norm=recipe == "r50")
    lr, lr_backbone, wd = 1e-4, (1e-5 if recipe == "r50" else 5e-5), 1e-4
    bias_wd = 0.0 if recipe == "r34" else None
    groups = build_param_groups(
        model, lr=lr, lr_backbone=lr_backbone, weight_decay=wd, norm_weight_decay=0.0, bias_weight_decay=bias_wd
    )
    rule = _published_r50 if recipe == "r50" else _published_r34
    values = {"lr": lr, "lr_backbone": lr_backbone, "wd": wd}
    expected = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group_lr, group_wd = rule(name)
            expected[name] = (values[group_lr], values.get(group_wd, group_wd))
    assert _setting_by_name(model, groups) == expected


def test_norms_found_by_type_not_name():
    model = nn.Sequential()
    model.add_module("backbone", nn.Conv2d(1, 1, 1))
    model.add_module("head", nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2), nn.LayerNorm(2)))
    roles = parameter_roles(model)
    assert roles == {
        "backbone.weight": "backbone",
        "backbone.bias": "backbone",
        "head.0.weight": "other",
        "head.0.bias": "bias",
        "head.1.weight": "norm",
        "head.1.bias": "norm",
        "head.2.weight": "norm",
        "head.2.bias": "norm",
    }
    # bias_weight_decay None: biases stay with the rest; equal settings merge.
    groups = build_param_groups(model, lr=1.0, lr_backbone=1.0, weight_decay=0.1, norm_weight_decay=0.0)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(4, 0.1), (4, 0.0)]


def test_prefix_boundary_shared_and_errors():
    model = nn.Module()
    model.backbone = nn.Linear(1, 1)
    model.backbone_extra = nn.Linear(1, 1)  # not under "backbone."
    model.tied = model.backbone_extra  # shared: counted once
    roles = parameter_roles(model, backbone_prefix=("backbone",))
    assert roles == {"backbone.weight": "backbone", "backbone.bias": "backbone",
                     "backbone_extra.weight": "other", "backbone_extra.bias": "bias"}  # fmt: skip
    with pytest.raises(ValueError, match="no trainable"):
        build_param_groups(model.requires_grad_(False), lr=1, lr_backbone=1, weight_decay=0)
    with pytest.raises(ValueError, match="learning rates"):
        build_param_groups(nn.Linear(1, 1), lr=-1, lr_backbone=1, weight_decay=0)
    # lr_backbone 0 is allowed (a frozen backbone has no parameters in the groups)
    assert len(build_param_groups(nn.Linear(1, 1), lr=1, lr_backbone=0, weight_decay=0)) == 1


# The published regexes of each recipe (DESIGN_RTDETR "Training"), first match wins; rest: (lr, wd).
_PUBLISHED = {
    "r50vd": [
        (r"^(?=.*backbone)(?!.*norm).*$", "lr_backbone", "wd"),
        (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", "lr", 0.0),
    ],
    "r101vd": [
        (r"^(?=.*backbone)(?!.*norm|bn).*$", "lr_backbone", "wd"),
        (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", "lr", 0.0),
    ],
    "r34vd": [
        (r"^(?=.*backbone)(?!.*norm|bn).*$", "lr_backbone", "wd"),
        (r"^(?=.*backbone)(?=.*norm|bn).*$", "lr_backbone", 0.0),
        (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", "lr", 0.0),
    ],
    "r18vd": [(r"^(?=.*(?:norm|bn)).*$", "lr", 0.0)],
}


def _recipe_model(name: str):
    build = pytest.importorskip("models.rtdetrv2.build")
    config = pytest.importorskip("models.rtdetrv2.config")
    cfg = config.recipe(name)
    with torch.device("meta"):  # structure only: no memory, no init cost
        return cfg, build.build_model(cfg, 80)


def _recipe_groups(cfg, model):
    return build_param_groups(
        model,
        lr=cfg.lr,
        lr_backbone=cfg.lr_backbone,
        weight_decay=cfg.weight_decay,
        norm_weight_decay=cfg.norm_weight_decay,
        bias_weight_decay=cfg.bias_weight_decay,
    )


def test_published_r50_group_counts():
    """Contract: groups (r50) are 52 / 126 / 209 tensors, 42,862,860 trainable elements."""
    cfg, model = _recipe_model("r50vd")
    groups = _recipe_groups(cfg, model)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (52, 1e-5, 1e-4),
        (126, 1e-4, 0.0),
        (209, 1e-4, 1e-4),
    ]
    assert sum(p.numel() for g in groups for p in g["params"]) == 42_862_860


@pytest.mark.parametrize("name", ["r50vd", "r34vd", "r18vd"])
def test_recipe_groups_equal_published_regexes(name):
    cfg, model = _recipe_model(name)
    values = {"lr": cfg.lr, "lr_backbone": cfg.lr_backbone, "wd": cfg.weight_decay}
    expected = {}
    for param_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        setting = ("lr", "wd")
        for pattern, group_lr, group_wd in _PUBLISHED[name]:
            if re.match(pattern, param_name):
                setting = (group_lr, group_wd)
                break
        expected[param_name] = (values[setting[0]], values.get(setting[1], setting[1]))
    assert _setting_by_name(model, _recipe_groups(cfg, model)) == expected


def test_recipe_optimizer_is_fused_adamw_over_the_role_groups():
    """build_optimizer under the recipes' norm weight decay: AdamW (the fused kernel on CPU) over exactly the role
    groups, with their lr / weight decay."""
    from helpers import parse_tiny_args

    from run.recipe import build_optimizer

    args = parse_tiny_args("--model", "rtdetrv2", "--lr", "3e-4", "--lr_backbone", "3e-5")
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("decoder", nn.Linear(4, 2))
    optimizer = build_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    wd, norm_wd = args.weight_decay, args.norm_weight_decay
    expected = {
        "backbone.0.weight": (3e-5, wd), "backbone.0.bias": (3e-5, wd), "backbone.1.weight": (3e-5, norm_wd),
        "backbone.1.bias": (3e-5, norm_wd), "decoder.weight": (3e-4, wd), "decoder.bias": (3e-4, wd),
    }  # fmt: skip
    assert {n: by_param[id(p)] for n, p in model.named_parameters()} == expected
