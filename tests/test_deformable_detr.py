"""Deformable DETR: published key layout of the five recipes, init rules, and the pieces of the forward pass
against straightforward computations written here."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import TINY_FLAGS

import models
from main import get_args_parser
from models.box_refinement import inverse_sigmoid, refine_boxes
from models.deformable_detr import DeformableDETR
from models.deformable_detr.transformer import (
    DeformableTransformer,
    DeformableTransformerEncoder,
    box_sine_embedding,
    encoder_proposals,
    valid_ratios,
)
from models.multiscale import build_multiscale_backbone
from util.misc import nested_tensor_from_tensor_list

RECIPES = {
    "single_scale": (["--num_feature_levels", "1"], 549, 33_844_193),
    "single_scale_dc5": (["--num_feature_levels", "1", "--dilation"], 549, 33_844_193),
    "multi_scale": ([], 561, 39_847_265),
    "refine": (["--with_box_refine"], 597, 40_627_260),
    "two_stage": (["--with_box_refine", "--two_stage"], 630, 40_959_129),
}


def _build(flags: list[str], device: str = "cpu") -> DeformableDETR:
    args = get_args_parser().parse_args(["--model", "deformable_detr", *flags])
    settings = models.FAMILIES["deformable_detr"].make_settings(vars(args))
    stages = [1, 2, 3] if args.num_feature_levels > 1 else [3]
    position = {"scale": settings.position_embedding_scale, "offset": -0.5}
    with torch.device(device):
        transformer = DeformableTransformer(
            args.hidden_dim, args.nheads, args.enc_layers, args.dec_layers, args.dim_feedforward, args.dropout,
            args.num_feature_levels, args.dec_n_points, args.enc_n_points, args.two_stage, args.num_queries,
        )  # fmt: skip
        return DeformableDETR(
            build_multiscale_backbone(settings, stages, **position), transformer, 91, args.num_queries,
            args.num_feature_levels, args.aux_loss, args.with_box_refine, args.two_stage,
        )  # fmt: skip


def _tiny(*flags: str) -> DeformableDETR:
    return _build([*TINY_FLAGS, *flags])


def _published_keys(levels: int, refine: bool, two_stage: bool) -> dict[str, tuple[int, ...]]:
    """The published checkpoint layout, written from the contract (DESIGN_DEFORMABLE.md), R50, 256-d."""
    resnet = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    keys = {
        f"backbone.0.body.{k}": tuple(v.shape)
        for k, v in resnet.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    in_channels = [512, 1024, 2048] if levels > 1 else [2048]
    for lvl in range(levels):
        conv = (256, in_channels[lvl], 1, 1) if lvl < len(in_channels) else (256, 2048 if lvl == 3 else 256, 3, 3)
        keys.update({f"input_proj.{lvl}.0.weight": conv, f"input_proj.{lvl}.0.bias": (256,)})
        keys.update({f"input_proj.{lvl}.1.weight": (256,), f"input_proj.{lvl}.1.bias": (256,)})
    keys["transformer.level_embed"] = (levels, 256)

    def deform(prefix: str) -> None:
        for name, out in (("sampling_offsets", 8 * levels * 4 * 2), ("attention_weights", 8 * levels * 4),
                          ("value_proj", 256), ("output_proj", 256)):  # fmt: skip
            keys.update({f"{prefix}.{name}.weight": (out, 256), f"{prefix}.{name}.bias": (out,)})

    def linear(prefix: str, out: int, inp: int) -> None:
        keys.update({f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)})

    for i in range(6):
        enc = f"transformer.encoder.layers.{i}"
        deform(f"{enc}.self_attn")
        linear(f"{enc}.linear1", 1024, 256)
        linear(f"{enc}.linear2", 256, 1024)
        for norm in ("norm1", "norm2"):
            keys.update({f"{enc}.{norm}.weight": (256,), f"{enc}.{norm}.bias": (256,)})
        dec = f"transformer.decoder.layers.{i}"
        deform(f"{dec}.cross_attn")
        keys.update({f"{dec}.self_attn.in_proj_weight": (768, 256), f"{dec}.self_attn.in_proj_bias": (768,)})
        linear(f"{dec}.self_attn.out_proj", 256, 256)
        linear(f"{dec}.linear1", 1024, 256)
        linear(f"{dec}.linear2", 256, 1024)
        for norm in ("norm1", "norm2", "norm3"):
            keys.update({f"{dec}.{norm}.weight": (256,), f"{dec}.{norm}.bias": (256,)})
    heads = 7 if two_stage else 6
    prefixes = [""] + (["transformer.decoder."] if refine else [])
    for i in range(heads):
        for prefix in prefixes:
            for j, out in enumerate((256, 256, 4)):
                linear(f"{prefix}bbox_embed.{i}.layers.{j}", out, 256)
        for prefix in [""] + (["transformer.decoder."] if two_stage else []):
            linear(f"{prefix}class_embed.{i}", 91, 256)
    if two_stage:
        linear("transformer.enc_output", 256, 256)
        keys.update({"transformer.enc_output_norm.weight": (256,), "transformer.enc_output_norm.bias": (256,)})
        linear("transformer.pos_trans", 512, 512)
        keys.update({"transformer.pos_trans_norm.weight": (512,), "transformer.pos_trans_norm.bias": (512,)})
    else:
        keys["query_embed.weight"] = (300, 512)
        linear("transformer.reference_points", 2, 256)
    return keys


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_published_state_dict_layout(recipe):
    flags, n_keys, n_trainable = RECIPES[recipe]
    model = _build(["--backbone_weights", "none", *flags], device="meta")
    state = model.state_dict()
    expected = _published_keys(1 if "1" in flags else 4, "--with_box_refine" in flags, "--two_stage" in flags)
    assert len(expected) == n_keys  # the contract's count: our reconstruction of the layout is complete
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 for v in state.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_trainable


def test_shared_heads_are_the_same_tensors():
    plain = _tiny().state_dict(keep_vars=True)
    assert all(plain[f"class_embed.{i}.weight"] is plain["class_embed.0.weight"] for i in range(2))
    assert all(plain[f"bbox_embed.{i}.layers.2.bias"] is plain["bbox_embed.0.layers.2.bias"] for i in range(2))
    refine = _tiny("--with_box_refine").state_dict(keep_vars=True)
    assert refine["bbox_embed.1.layers.0.weight"] is not refine["bbox_embed.0.layers.0.weight"]
    assert refine["transformer.decoder.bbox_embed.1.layers.0.weight"] is refine["bbox_embed.1.layers.0.weight"]
    two = _tiny("--with_box_refine", "--two_stage").state_dict(keep_vars=True)
    assert two["transformer.decoder.class_embed.2.weight"] is two["class_embed.2.weight"]
    # named_parameters yields a shared tensor once, under the first name met: the transformer is registered first
    # (published order, so the optimizer's parameter order matches published optimizer states).
    names = [n for n, _ in _tiny("--with_box_refine").named_parameters()]
    assert len(names) == len(set(names)) and names[0] == "transformer.level_embed"
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" in names and "bbox_embed.0.layers.0.weight" not in names
    assert "class_embed.0.weight" in names


def test_head_init_rules():
    prior = -math.log((1 - 0.01) / 0.01)
    for flags, wh_bias in (((), [-2.0, -2.0]), (("--with_box_refine",), [-2.0, 0.0]),
                           (("--with_box_refine", "--two_stage"), [0.0, 0.0, 0.0])):  # fmt: skip
        model = _tiny(*flags)
        for i, head in enumerate(model.bbox_embed):
            assert torch.equal(head.layers[-1].weight, torch.zeros_like(head.layers[-1].weight))
            assert head.layers[-1].bias[:2].abs().max() == 0
            assert torch.allclose(head.layers[-1].bias[2:], torch.full((2,), wh_bias[i]))
        for head in model.class_embed:
            assert torch.allclose(head.bias, torch.full_like(head.bias, prior))
    model = _tiny()
    for proj in model.input_proj:
        assert proj[0].bias.abs().max() == 0 and proj[1].weight.eq(1).all()
    assert model.transformer.reference_points.bias.abs().max() == 0


def test_valid_ratios_and_encoder_reference_points():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, 3:, :] = True  # 3 valid rows
    mask[:, :, 4:] = True  # 4 valid columns
    assert torch.allclose(valid_ratios(mask), torch.tensor([[4 / 6, 3 / 4]]))
    shapes = torch.tensor([[4, 6], [2, 3]])
    ratios = torch.tensor([[[4 / 6, 3 / 4], [2 / 3, 1 / 2]]])
    ref = DeformableTransformerEncoder.get_reference_points(shapes, ratios, torch.device("cpu"))
    assert ref.shape == (1, 24 + 6, 2, 2)
    # Token (row 1, col 2) of level 0: centre (2.5, 1.5) / (valid size 4, 3), then scaled by each level's ratios.
    token = 1 * 6 + 2
    expected = torch.tensor([2.5 / 4, 1.5 / 3])[None] * ratios[0]
    assert torch.allclose(ref[0, token], expected)
    # Token (row 0, col 1) of level 1: centre (1.5, 0.5) / (valid size 2, 1).
    assert torch.allclose(ref[0, 24 + 1], torch.tensor([1.5 / 2, 0.5 / 1])[None] * ratios[0])


def test_encoder_proposals_against_a_loop():
    torch.manual_seed(0)
    shapes = torch.tensor([[3, 5], [2, 3]])
    mask = torch.zeros(2, 21, dtype=torch.bool)
    mask[1, 3:5] = True  # image 1, level 0: columns 3-4 of row 0 padded (valid W from the first row: 3)
    mask[1, 15 + 2] = True  # level 1, column 2 of row 0 padded
    memory = torch.randn(2, 21, 8)
    out_memory, proposals = encoder_proposals(memory, mask, shapes)
    for b in range(2):
        start = 0
        for lvl, (h, w) in enumerate(shapes.tolist()):
            level_mask = mask[b, start : start + h * w].view(h, w)
            valid_h, valid_w = int((~level_mask[:, 0]).sum()), int((~level_mask[0, :]).sum())
            for y in range(h):
                for x in range(w):
                    s = start + y * w + x
                    box = torch.tensor([(x + 0.5) / valid_w, (y + 0.5) / valid_h, 0.05 * 2**lvl, 0.05 * 2**lvl])
                    ok = bool(((box > 0.01) & (box < 0.99)).all()) and not bool(mask[b, s])
                    if ok:
                        assert torch.allclose(proposals[b, s], torch.log(box / (1 - box)), atol=1e-6)
                        assert torch.equal(out_memory[b, s], memory[b, s])
                    else:
                        assert torch.isinf(proposals[b, s]).all() and out_memory[b, s].abs().max() == 0
            start += h * w


def test_box_sine_embedding_against_a_loop():
    coords = torch.rand(2, 3, 4)
    out = box_sine_embedding(coords, num_feats=8)
    assert out.shape == (2, 3, 32)
    for c in range(4):
        for i in range(8):
            angle = coords[..., c] * 2 * math.pi / 10000 ** (2 * (i // 2) / 8)
            expected = angle.sin() if i % 2 == 0 else angle.cos()
            assert torch.allclose(out[..., c * 8 + i], expected, atol=1e-6)


def test_inverse_sigmoid_clamp_and_refinement():
    x = torch.tensor([0.0, 1e-7, 0.3, 1.0, 1.5])
    expected = [math.log(1e-5 / 1.0), math.log(1e-5 / (1 - 1e-7)), math.log(0.3 / 0.7), math.log(1 / 1e-5)]
    assert torch.allclose(inverse_sigmoid(x)[:4], torch.tensor(expected), atol=1e-5)
    assert inverse_sigmoid(x)[4] == inverse_sigmoid(x)[3]  # clamped to 1 first
    delta, ref2 = torch.randn(5, 4), torch.rand(5, 2)
    out = refine_boxes(delta, ref2)
    assert torch.allclose(out[:, 2:], delta[:, 2:].sigmoid())
    assert torch.allclose(out[:, :2], (delta[:, :2] + inverse_sigmoid(ref2)).sigmoid())


def _images():
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 80, 50)])


@pytest.mark.parametrize("flags", [(), ("--num_feature_levels", "1"), ("--with_box_refine",),
                                   ("--with_box_refine", "--two_stage")])  # fmt: skip
def test_forward_shapes(flags):
    model = _tiny(*flags).eval()
    out = model(_images())
    assert out["pred_logits"].shape == (2, 10, 91) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    if "--two_stage" in flags:
        # padded batch 80 x 96: strides 8, 16, 32 and the extra stride-64 level (3x3 convs round up)
        tokens = sum(h * w for h, w in ((10, 12), (5, 6), (3, 3), (2, 2)))
        assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, 91)
        assert not hasattr(model, "query_embed")
    else:
        assert "enc_outputs" not in out


def test_refined_references_are_detached():
    """Layer 1's boxes refine layer 0's detached box: their loss gives layer 0's box head no gradient."""
    model = _tiny("--with_box_refine")
    out = model(_images())
    out["pred_boxes"].sum().backward()
    assert model.bbox_embed[0].layers[0].weight.grad is None or model.bbox_embed[0].layers[0].weight.grad.eq(0).all()
    assert model.bbox_embed[1].layers[-1].weight.grad.abs().sum() > 0


def test_two_stage_queries_come_from_the_top_class0_proposals():
    model = _tiny("--with_box_refine", "--two_stage").eval()
    captured = {}
    decoder = model.transformer.decoder
    hook = decoder.register_forward_hook(lambda m, args, out: captured.update(ref=args[1]))
    out = model(_images())
    hook.remove()
    enc_logits, enc_boxes = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    top = enc_logits[..., 0].topk(10, dim=1).indices
    expected = torch.gather(enc_boxes, 1, top[..., None].expand(-1, -1, 4))
    assert torch.allclose(captured["ref"], expected, atol=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--masks"], "--masks"),
        (["--spatial_prior", "gaussian"], "--spatial_prior gaussian"),
        (["--two_stage"], "--with_box_refine"),
        (["--num_feature_levels", "2"], "--num_feature_levels 2"),
    ],
)
def test_flags_that_do_not_combine(flags, message):
    from models import build_model

    args = get_args_parser().parse_args(["--model", "deformable_detr", *TINY_FLAGS, *flags])
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        build_model(args)


RECIPE_CONFIGS = {
    "deformable_detr_single_scale": "single_scale",
    "deformable_detr_single_scale_dc5": "single_scale_dc5",
    "deformable_detr": "multi_scale",
    "deformable_detr_refine": "refine",
    "deformable_detr_two_stage": "two_stage",
}


@pytest.mark.parametrize("config", sorted(RECIPE_CONFIGS))
def test_recipe_configs_and_published_command_lines(config):
    """The shipped YAML of each recipe and its published command line (+ --model) give the same arguments."""
    from main import parse_args

    flags = RECIPES[RECIPE_CONFIGS[config]][0]
    from_yaml = parse_args(["--config", f"configs/{config}.yaml"])
    from_flags = parse_args(["--model", "deformable_detr", "--output_dir", "exps/r50", *flags])
    for key in ("model", "num_feature_levels", "dilation", "with_box_refine", "two_stage", "lr", "lr_backbone",
                "epochs", "lr_drop", "num_queries", "dim_feedforward", "cls_loss_coef", "set_cost_class"):  # fmt: skip
        assert getattr(from_yaml, key) == getattr(from_flags, key), key
    assert (from_flags.lr, from_flags.epochs, from_flags.lr_drop, from_flags.num_queries) == (2e-4, 50, 40, 300)


def test_deformable_flags_without_model_are_an_error():
    from models import build_model

    args = get_args_parser().parse_args([*TINY_FLAGS, "--with_box_refine"])
    with pytest.raises(ValueError, match="add --model deformable_detr"):
        build_model(args)
