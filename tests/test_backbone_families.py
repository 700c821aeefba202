"""Swin and timm backbones inside the families (``--backbone swin_*|timm:NAME``): the published DINO Swin-L key
layout and parameter counts, strict loading that reproduces outputs, published ImageNet Swin files through
``--backbone_weights``, one training step with tiny timm models, rebuilding checkpoints from their keys or stored
args, and the one-line errors."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args
from test_dino import _published_keys
from test_swin_transformer import PUBLISHED, _imagenet_layout, published_layout

from cli.arguments import get_args_parser
from models import build_model
from models.backbone import backbone_levels_of, backbone_of, check_backbone_name
from models.feature_maps import FrozenBatchNorm2d
from models.swin_transformer import SWIN_CONFIGS, build_swin_backbone
from run.model_loading import load_model
from util.misc import nested_tensor_from_tensor_list

FIVE_SCALE = ("--num_feature_levels", "5", "--return_interm_indices", "0", "1", "2", "3")
TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])},
]


def _images():
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 48, 56)])


def _published_args(name: str, *flags: str) -> argparse.Namespace:
    """The published DINO Swin recipe (DINO's own defaults, 91 classes), random backbone weights."""
    args = get_args_parser().parse_args(["--model", "dino", "--backbone", name, "--backbone_weights", "none", *flags])
    args.num_classes = None
    return args


def dino_swin_layout(name: str, levels: int, stages: list[int]) -> dict[str, tuple[int, ...]]:
    """A published DINO Swin checkpoint's keys and shapes: the DINO transformer and heads of the contract
    (``test_dino._published_keys``), the Swin under ``backbone.0.`` (``test_swin_transformer.published_layout``)
    and input projections from the returned Swin stages (the first extra level reads the last stage)."""
    embed, depths, heads, window, _ = PUBLISHED[name]
    keys = {
        k: v for k, v in _published_keys(levels, stages).items() if not k.startswith(("backbone.0.", "input_proj."))
    }
    keys.update({f"backbone.0.{k}": v for k, v in published_layout(embed, depths, heads, window, stages).items()})
    channels = [embed * 2**s for s in stages]
    for lvl in range(levels):
        if lvl < len(channels):
            keys[f"input_proj.{lvl}.0.weight"] = (256, channels[lvl], 1, 1)
        else:
            keys[f"input_proj.{lvl}.0.weight"] = (256, channels[-1] if lvl == len(channels) else 256, 3, 3)
        for part in ("0.bias", "1.weight", "1.bias"):
            keys[f"input_proj.{lvl}.{part}"] = (256,)
    return keys


# DINO 4-scale Swin-L (levels 1 2 3 + one extra) and 5-scale (0 1 2 3 + one extra), as published.
SWIN_L_CASES = [((), 4, [1, 2, 3], 217_230_066), (FIVE_SCALE, 5, [0, 1, 2, 3], 217_576_690)]


@pytest.mark.parametrize("flags, levels, stages, n_params", SWIN_L_CASES)
def test_published_dino_swin_l_key_layout_and_parameter_count(flags, levels, stages, n_params):
    with torch.device("meta"):
        model = build_model(_published_args("swin_L_384_22k", "--device", "meta", *flags))[0]
    expected = dino_swin_layout("swin_L_384_22k", levels, stages)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert state["backbone.0.layers.0.blocks.0.attn.relative_position_index"].dtype == torch.long
    # Parameters: the layout's entries without the relative-position index buffers, each tensor once: published
    # DINO shares one class head and one box head among the decoder layers, each under two names
    # (``class_embed.{i}`` and ``transformer.decoder.class_embed.{i}``).
    shared = re.compile(r"(transformer\.decoder\.)?(class|bbox)_embed\.(\d+)\.")
    from_layout = sum(
        math.prod(s)
        for k, s in expected.items()
        if not k.endswith("relative_position_index")
        and not ((m := shared.match(k)) and (m.group(1) or m.group(3) != "0"))
    )
    assert sum(p.numel() for p in model.parameters()) == from_layout == n_params
    assert backbone_of(state) == "swin_L_384_22k" and backbone_levels_of(state) == stages


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_published_swin_is_told_by_its_keys(name):
    with torch.device("meta"):
        state = build_swin_backbone(name, (1, 2, 3)).state_dict()
    prefixed = {f"backbone.0.{k}": v for k, v in state.items()}
    assert backbone_of(prefixed) == name and backbone_levels_of(prefixed) == [1, 2, 3]
    assert backbone_of({f"detr.{k}": v for k, v in prefixed.items()}, "detr.") == name


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    images = _images()
    with torch.no_grad():
        out_a, out_b = a.eval()(images), b.eval()(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("flags, levels, stages, n_params", SWIN_L_CASES)
def test_published_layout_swin_l_dino_state_dict_loads_strictly_and_reproduces_outputs(flags, levels, stages, n_params):
    """The whole published DINO Swin-L (4- and 5-scale): a state dict with the published keys and shapes, in a
    published-style file (a Namespace with 'modelname'), rebuilt by predict.py's loader from the file alone."""
    source = build_model(_published_args("swin_L_384_22k", "--device", "cpu", *flags))[0]
    state = source.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == dino_swin_layout("swin_L_384_22k", levels, stages)
    stored = argparse.Namespace(modelname="dino", backbone="swin_L_384_22k", use_checkpoint=True,
                                return_interm_indices=stages, num_feature_levels=levels)  # fmt: skip
    loaded, _, margs, _ = load_model("swin_l.pth", checkpoint={"model": state, "args": stored})
    assert (margs.backbone, margs.return_interm_indices, margs.num_feature_levels) == ("swin_L_384_22k", stages, levels)
    _assert_same_outputs(source, loaded)


def test_swin_l_dino_state_dict_loads_strictly_into_a_model_built_from_flags():
    """The default-run version of the test above: the Swin-L backbone with a small DINO transformer; the second
    model is built on the meta device from the same flags and takes the state dict strictly (``assign``)."""
    args = parse_tiny_args(*FAMILY_FLAGS["dino"], "--backbone", "swin_L_384_22k", "--nheads", "8")
    source = build_model(args)[0]
    state = source.state_dict()
    assert backbone_of(state) == "swin_L_384_22k" and backbone_levels_of(state) == [1, 2, 3]
    with torch.device("meta"):
        loaded = build_model(args)[0]
    loaded.load_state_dict(state, strict=True, assign=True)
    images = nested_tensor_from_tensor_list([torch.randn(3, 40, 32)])
    with torch.no_grad():
        out_a, out_b = source.eval()(images), loaded.eval()(images)
    torch.testing.assert_close(out_a["pred_boxes"], out_b["pred_boxes"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["dino", "deformable_detr", "detr"])
def test_swin_checkpoint_rebuilds_from_its_keys_alone(family):
    """No stored args: the keys tell the Swin and (DINO) its levels; predict.py's loader reproduces the outputs."""
    flags = FIVE_SCALE if family == "dino" else ()
    args = parse_tiny_args(*FAMILY_FLAGS[family], "--backbone", "swin_T_224_1k", "--nheads", "8", *flags)
    source = build_model(args)[0]
    loaded, _, margs, _ = load_model("swin_t.pth", checkpoint={"model": source.state_dict()})
    assert margs.model == family and margs.backbone == "swin_T_224_1k"
    if family == "dino":
        assert margs.return_interm_indices == [0, 1, 2, 3]
    _assert_same_outputs(source, loaded)


def test_published_imagenet_swin_file_loads_through_backbone_weights(tmp_path):
    torch.manual_seed(3)
    source = build_swin_backbone("swin_T_224_1k", (0, 1, 2, 3)).eval()
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": _imagenet_layout(source, SWIN_CONFIGS["swin_T_224_1k"], num_classes=1000)}, path)
    for family in ("dino", "deformable_detr"):
        args = parse_tiny_args(*FAMILY_FLAGS[family], "--backbone", "swin_T_224_1k", "--backbone_weights", str(path))
        backbone = build_model(args)[0].backbone[0].eval()
        # The published loader keeps the output norms norm{i} (absent from ImageNet files) at their initialisation.
        for key, value in backbone.state_dict().items():
            if not key.startswith("norm"):
                torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0, msg=key)
        assert backbone.out_indices == [1, 2, 3] and backbone.norm3.weight.eq(1).all()
        images = torch.randn(1, 3, 64, 48)
        with torch.no_grad():  # both keep identity output norms, so the levels 1 2 3 agree
            for ours, theirs in zip(backbone.forward_features(images), source.forward_features(images)[1:]):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# Two tiny timm models of different families (a ConvNeXt, an EfficientNet) in both deformable families.
TIMM_CASES = [("deformable_detr", "test_convnext"), ("dino", "test_efficientnet"), ("dino", "test_convnext")]


@pytest.mark.parametrize("family, name", TIMM_CASES)
def test_timm_backbone_trains_one_step_in_the_family(family, name):
    pytest.importorskip("timm")
    args = parse_tiny_args(*FAMILY_FLAGS[family], "--backbone", f"timm:{name}", "--num_classes", "5")
    model, criterion, _ = build_model(args)
    model.train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone[0].modules()) == (name == "test_efficientnet")
    out = model(_images(), TARGETS) if family == "dino" else model(_images())
    losses = criterion(out, TARGETS)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert torch.isfinite(total)
    total.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    backbone = [n for n in trainable if n.startswith("backbone.")]
    # The published lr group (--lr_backbone_names backbone.0) holds exactly the backbone's parameters.
    assert backbone and all(n.startswith("backbone.0.body.") for n in backbone)
    assert {n for n in trainable if "backbone.0" in n} == set(backbone)
    assert any(trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0 for n in backbone)
    proj = trainable["input_proj.0.0.weight"]
    assert proj.grad is not None and proj.grad.abs().sum() > 0


def test_timm_checkpoint_rebuilds_from_its_stored_args_only():
    pytest.importorskip("timm")
    args = parse_tiny_args(*FAMILY_FLAGS["dino"], "--backbone", "timm:test_convnext", "--num_classes", "5")
    source = build_model(args)[0]
    state = source.state_dict()
    assert backbone_of(state) is None and backbone_levels_of(state) is None  # the keys do not tell a timm model
    loaded, _, margs, _ = load_model("timm.pth", checkpoint={"model": state, "args": vars(args)})
    assert margs.backbone == "timm:test_convnext"
    _assert_same_outputs(source, loaded)
    check_backbone_name(state, "timm:test_convnext")
    with pytest.raises(ValueError) as err:
        check_backbone_name(state, "resnet50")  # what a checkpoint without stored args would rebuild
    message = str(err.value)
    assert "timm model" in message and "--backbone timm:NAME" in message and "\n" not in message
    # predict.py's loader says so too, instead of a strict-load failure listing keys.
    with pytest.raises(ValueError, match="whose name its weights do not tell"):
        load_model("timm.pth", checkpoint={"model": state, "args": {"model": "dino"}})
    # ResNets (truncated ones too) and Swins are told by their keys, never taken for timm models.
    resnet = build_model(parse_tiny_args(*FAMILY_FLAGS["dino"], "--backbone_stages", "3",
                                         "--return_interm_indices", "1", "2"))[0].state_dict()  # fmt: skip
    check_backbone_name(resnet, "resnet50")


def test_use_checkpoint_reaches_swin_and_timm_backbones():
    swin = build_model(parse_tiny_args(*FAMILY_FLAGS["dino"], "--backbone", "swin_T_224_1k", "--use_checkpoint"))[0]
    assert all(stage.use_checkpoint for stage in swin.backbone[0].layers)
    plain = build_model(parse_tiny_args(*FAMILY_FLAGS["dino"], "--backbone", "swin_T_224_1k"))[0]
    assert not any(stage.use_checkpoint for stage in plain.backbone[0].layers)
    if pytest.importorskip("timm"):
        flags = ("--backbone", "timm:test_convnext", "--use_checkpoint")
        timm_model = build_model(parse_tiny_args(*FAMILY_FLAGS["deformable_detr"], *flags))[0]
        assert timm_model.backbone[0].body.grad_checkpointing


def test_detr_reads_the_last_swin_level_and_its_mask_head_takes_all_four():
    detr = build_model(parse_tiny_args("--backbone", "swin_T_224_1k"))[0]
    assert detr.backbone[0].out_indices == [3] and detr.input_proj.in_channels == 768
    out = detr(_images())
    assert torch.isfinite(out["pred_boxes"]).all()
    segm = build_model(parse_tiny_args("--backbone", "swin_T_224_1k", "--masks"))[0]
    assert segm.detr.backbone[0].out_indices == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--backbone", "swin_S_224_1k"), "--backbone swin_S_224_1k: unknown; choose one of resnet18, resnet34, "
         "resnet50, resnet101, swin_T_224_1k, swin_B_224_22k, swin_B_384_22k, swin_L_224_22k, swin_L_384_22k, "
         "timm:NAME"),
        (("--backbone", "swin_T_224_1k", "--dilation"), "--dilation is for the ResNet backbones only"),
        (("--backbone", "swin_T_224_1k", "--backbone_stages", "3"), "--backbone_stages is for the ResNet backbones"),
        (("--backbone", "resnet18", "--use_checkpoint"), "--use_checkpoint is for the Swin and timm backbones"),
        (("--backbone", "swin_T_224_1k", "--backbone_weights", "imagenet"), "Swin weights are not downloaded"),
        (("--backbone", "timm:test_convnext", "--masks"), "--masks needs stage channels that halve"),
    ],
)  # fmt: skip
def test_bad_backbone_flags_are_one_line_errors(flags, message):
    if "timm:" in flags[1]:
        pytest.importorskip("timm")
    model = "detr" if "--masks" in flags or "--backbone_stages" in flags else "dino"  # DINO refuses stages first
    with pytest.raises(ValueError) as err:
        build_model(parse_tiny_args(*FAMILY_FLAGS[model], *flags))
    assert message in str(err.value) and "\n" not in str(err.value)
