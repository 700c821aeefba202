"""DINO: published defaults and key layout (4- and 5-scale), shared heads, init, mixed query selection,
look-forward-twice, and that denoising neither leaks into nor runs in the matching part."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import TINY_FLAGS

from main import get_args_parser
from models import build_model
from models.box_refinement import DINO_EPS, inverse_sigmoid
from util.misc import nested_tensor_from_tensor_list

FIVE_SCALE = ["--num_feature_levels", "5", "--return_interm_indices", "0", "1", "2", "3"]


def _args(*flags: str):
    args = get_args_parser().parse_args(["--model", "dino", *flags])
    args.num_classes = None
    return args


def _tiny(*flags: str):
    model, criterion, postprocessors = build_model(_args(*TINY_FLAGS, "--dn_number", "4", *flags))
    return model, criterion, postprocessors


def _images():
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 80, 50)])


TARGETS = [
    {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
    {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])},
]


def test_published_defaults():
    args = _args()
    expected = dict(lr=1e-4, lr_backbone=1e-5, epochs=12, lr_drop=11, dim_feedforward=2048, dropout=0.0,
                    num_queries=900, cls_loss_coef=1.0, bbox_loss_coef=5, giou_loss_coef=2, set_cost_class=2.0,
                    num_feature_levels=4, return_interm_indices=[1, 2, 3], pe_temperatureH=20, pe_temperatureW=20,
                    dn_number=100, dn_label_noise_ratio=0.5, dn_box_noise_scale=0.4, num_select=300,
                    interm_loss_coef=1.0, focal_alpha=0.25, clip_max_norm=0.1, batch_size=2, weight_decay=1e-4,
                    lr_linear_proj_names=["reference_points", "sampling_offsets"], lr_linear_proj_mult=0.1)  # fmt: skip
    assert {k: getattr(args, k) for k in expected} == expected
    assert _args("--lr", "3e-4", "--num_queries", "300").num_queries == 300  # explicit flags still win


def _published_keys(levels: int, stages: list[int]) -> dict[str, tuple[int, ...]]:
    """DINO's checkpoint layout written from the contract (DESIGN_DINO.md "State dict"), R50, 256-d, 900 queries."""
    resnet = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    keys = {
        f"backbone.0.body.{k}": tuple(v.shape)
        for k, v in resnet.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    channels = [(256, 512, 1024, 2048)[s] for s in stages]

    def linear(prefix: str, out: int, inp: int) -> None:
        keys.update({f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)})

    def norm(prefix: str, dim: int = 256) -> None:
        keys.update({f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)})

    for lvl in range(levels):
        extra = lvl >= len(channels)
        keys[f"input_proj.{lvl}.0.weight"] = (256, 2048, 3, 3) if extra else (256, channels[lvl], 1, 1)
        keys[f"input_proj.{lvl}.0.bias"] = (256,)
        norm(f"input_proj.{lvl}.1")
    keys["transformer.level_embed"] = (levels, 256)

    def deform(prefix: str) -> None:
        linear(f"{prefix}.sampling_offsets", 8 * levels * 4 * 2, 256)
        linear(f"{prefix}.attention_weights", 8 * levels * 4, 256)
        linear(f"{prefix}.value_proj", 256, 256)
        linear(f"{prefix}.output_proj", 256, 256)

    for i in range(6):
        enc, dec = f"transformer.encoder.layers.{i}", f"transformer.decoder.layers.{i}"
        deform(f"{enc}.self_attn")
        linear(f"{enc}.linear1", 2048, 256)
        linear(f"{enc}.linear2", 256, 2048)
        norm(f"{enc}.norm1")
        norm(f"{enc}.norm2")
        deform(f"{dec}.cross_attn")
        keys.update({f"{dec}.self_attn.in_proj_weight": (768, 256), f"{dec}.self_attn.in_proj_bias": (768,)})
        linear(f"{dec}.self_attn.out_proj", 256, 256)
        linear(f"{dec}.linear1", 2048, 256)
        linear(f"{dec}.linear2", 256, 2048)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{dec}.{n}")
        for prefix in ("", "transformer.decoder."):
            linear(f"{prefix}class_embed.{i}", 91, 256)
            for j, out in enumerate((256, 256, 4)):
                linear(f"{prefix}bbox_embed.{i}.layers.{j}", out, 256)
    norm("transformer.decoder.norm")
    linear("transformer.decoder.ref_point_head.layers.0", 256, 512)
    linear("transformer.decoder.ref_point_head.layers.1", 256, 256)
    linear("transformer.enc_output", 256, 256)
    norm("transformer.enc_output_norm")
    linear("transformer.enc_out_class_embed", 91, 256)
    for j, out in enumerate((256, 256, 4)):
        linear(f"transformer.enc_out_bbox_embed.layers.{j}", out, 256)
    keys["transformer.tgt_embed.weight"] = (900, 256)
    keys["label_enc.weight"] = (92, 256)
    return keys


@pytest.mark.parametrize("flags, n_keys, stages", [([], 626, [1, 2, 3]), (FIVE_SCALE, 630, [0, 1, 2, 3])])
def test_published_state_dict_layout(flags, n_keys, stages):
    with torch.device("meta"):
        model = build_model(_args("--backbone_weights", "none", "--device", "meta", *flags))[0]
    state = model.state_dict()
    expected = _published_keys(5 if flags else 4, stages)
    assert len(expected) == n_keys
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 for v in state.values())


def test_shared_heads_four_names_and_init():
    model, _, _ = _tiny()
    state = model.state_dict(keep_vars=True)
    for name in ("class_embed.{}.weight", "bbox_embed.{}.layers.2.bias"):
        tensors = [state[p + name.format(i)] for p in ("", "transformer.decoder.") for i in range(2)]
        assert all(t is tensors[0] for t in tensors)
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.decoder.class_embed.0.weight" in names and "class_embed.0.weight" not in names
    assert len(names) == len(set(names))
    head, enc_head = model.class_embed[0], model.transformer.enc_out_class_embed
    assert torch.allclose(head.bias, torch.full_like(head.bias, -math.log(99)))
    assert torch.equal(head.weight, enc_head.weight) and head.weight is not enc_head.weight
    box = model.bbox_embed[0].layers[-1]
    assert box.weight.abs().max() == 0 and box.bias.abs().max() == 0
    # tgt_embed: xavier-uniform overwrote its normal init (published order): every entry within the xavier bound.
    weight = model.transformer.tgt_embed.weight
    assert weight.abs().max() <= math.sqrt(6 / sum(weight.shape))
    assert model.label_enc.weight.shape == (92, 32)


def test_labelbook_follows_num_classes_unless_set():
    args = _args(*TINY_FLAGS)
    args.num_classes = 13
    assert build_model(args)[0].label_enc.weight.shape[0] == 14
    args.dn_labelbook_size = 100
    assert build_model(args)[0].label_enc.weight.shape[0] == 101


def test_eval_uses_no_denoising_and_matching_part_does_not_see_dn_queries():
    model, _, _ = _tiny()
    images = _images()
    train_out = model.train()(images, TARGETS)
    assert train_out["dn_meta"]["pad_size"] > 0 and "output_known_lbs_bboxes" in train_out["dn_meta"]
    eval_out = model.eval()(images, TARGETS)
    assert eval_out["dn_meta"] is None
    assert eval_out["pred_logits"].shape == (2, 10, 91)
    # Dropout is 0 and nothing is batch-normalised in train mode, so the matching queries, which the mask keeps
    # from every denoising query, must give exactly the eval outputs.
    assert torch.allclose(train_out["pred_logits"], eval_out["pred_logits"], atol=1e-5)
    assert torch.allclose(train_out["pred_boxes"], eval_out["pred_boxes"], atol=1e-6)


def test_mixed_query_selection_and_look_forward_twice():
    model, _, _ = _tiny()
    model.eval()
    captured: dict = {}
    decoder = model.transformer.decoder
    hooks = [
        decoder.register_forward_hook(lambda m, a, out: captured.update(decoder_in=a, decoder_out=out)),
        decoder.layers[1].register_forward_pre_hook(lambda m, a: captured.update(layer1_ref=a[2])),
    ]
    out = model(_images())
    for hook in hooks:
        hook.remove()
    interm = out["interm_outputs"]
    # Positions of the queries: the selected proposals' boxes, detached; content: the learned tgt_embed.
    tgt, reference = captured["decoder_in"][0], captured["decoder_in"][1]
    assert torch.allclose(reference, interm["pred_boxes"]) and not reference.requires_grad
    assert interm["pred_boxes"].requires_grad
    assert torch.equal(tgt[0], model.transformer.tgt_embed.weight)
    hs, references = captured["decoder_out"]
    assert len(references) == 3 and not captured["layer1_ref"].requires_grad  # next layer gets it detached
    assert references[1].requires_grad  # ... but the prediction of layer 1 uses it with its gradient
    expected = (model.bbox_embed[1](hs[1]) + inverse_sigmoid(references[1], DINO_EPS)).sigmoid()
    assert torch.allclose(out["pred_boxes"], expected, atol=1e-6)
    # Look forward twice: layer 1's box loss reaches layer 0's box prediction through references[1].
    grad = torch.autograd.grad(out["pred_boxes"].sum(), references[1], retain_graph=True)[0]
    assert grad.abs().sum() > 0


def test_decoder_query_pos_is_the_yxwh_sine_embedding_of_the_reference():
    from models.deformable_detr.transformer import box_sine_embedding

    model, _, _ = _tiny()
    model.eval()
    captured: dict = {}
    layer0 = model.transformer.decoder.layers[0]
    hook = layer0.register_forward_pre_hook(lambda m, a: captured.update(pos=a[1], ref=a[2]))
    model(_images())
    hook.remove()
    box = captured["ref"][:, :, 0]
    half = 16
    manual = []
    for c in (1, 0, 2, 3):  # y, x, w, h
        for i in range(half):
            angle = box[..., c] * 2 * math.pi / 10000 ** (2 * (i // 2) / half)
            manual.append(angle.sin() if i % 2 == 0 else angle.cos())
    sine = torch.stack(manual, -1)
    assert torch.allclose(sine, box_sine_embedding(box[..., [1, 0, 2, 3]], half), atol=1e-6)
    assert torch.allclose(captured["pos"], model.transformer.decoder.ref_point_head(sine), atol=1e-6)


def test_train_step_losses_and_no_target_batch():
    model, criterion, postprocessors = _tiny()
    model.train()
    out = model(_images(), TARGETS)
    losses = criterion(out, TARGETS)
    assert {"loss_ce_dn", "loss_bbox_dn_0", "loss_giou_interm"} <= set(losses)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    assert model.label_enc.weight.grad.abs().sum() > 0
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(_images(), empty)
    assert out["dn_meta"] is None
    assert criterion(out, empty)["loss_ce_dn"] == 0
    results = postprocessors["bbox"](out, torch.tensor([[64, 96], [80, 50]]))
    assert results[0]["scores"].shape == (300,)


@pytest.mark.parametrize(
    "flags, message",
    [(["--lr_backbone", "0"], "--lr_backbone"), (["--masks"], "--masks"),
     (["--num_feature_levels", "2"], "--num_feature_levels 2")],
)  # fmt: skip
def test_flags_that_do_not_combine(flags, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        build_model(_args(*TINY_FLAGS, *flags))


@pytest.mark.parametrize(
    "config, levels, epochs, lr_drop",
    [("dino_4scale_r50", 4, 12, 11), ("dino_4scale_r50_24ep", 4, 24, 20), ("dino_4scale_r50_36ep", 4, 36, 30),
     ("dino_5scale_r50", 5, 12, 11)],
)  # fmt: skip
def test_recipe_configs(config, levels, epochs, lr_drop):
    from main import parse_args

    args = parse_args(["--config", f"configs/{config}.yaml"])
    assert (args.model, args.num_feature_levels, args.epochs, args.lr_drop) == ("dino", levels, epochs, lr_drop)
    assert args.return_interm_indices == ([0, 1, 2, 3] if levels == 5 else [1, 2, 3])
    assert (args.num_queries, args.dim_feedforward, args.lr, args.dn_number) == (900, 2048, 1e-4, 100)


def test_submitit_launcher_parser_applies_the_family_defaults():
    import run_with_submitit

    args = run_with_submitit.get_args_parser().parse_args(["--model", "dino", "--ngpus", "4"])
    assert (args.lr, args.num_queries, args.dim_feedforward, args.ngpus) == (1e-4, 900, 2048, 4)
    args = run_with_submitit.get_args_parser().parse_args(["--model", "deformable_detr", "--lr", "1e-3"])
    assert (args.lr, args.num_queries, args.lr_backbone) == (1e-3, 300, 2e-5)
