"""RT-DETRv2 model: sincos table, CCFF data flow, anchors, decoder (look-forward-twice, eval_idx), denoising,
post-processing, init, and a tiny train step / eval forward. Expected values come from the contract
(DESIGN_RTDETR) by hand or brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.denoising import prepare_for_rtdetr_cdn
from models.rtdetrv2 import (
    COCO_CATEGORY_IDS,
    HybridEncoder,
    RTDETRPostProcessor,
    RTDETRTransformerv2,
    build,
    generate_anchors,
    recipe,
    sincos_2d_position_embedding,
)
from util.box_ops import box_cxcywh_to_xyxy

TINY = dict(
    enc_hidden_dim=32, hidden_dim=32, nheads=2, dec_layers=2, dim_feedforward=64, enc_dim_feedforward=64,
    num_queries=20, eval_spatial_size=(64, 64), dn_number=6, num_select=10,
)  # fmt: skip


def tiny_decoder(**kw) -> RTDETRTransformerv2:
    args = dict(num_classes=5, hidden_dim=32, num_queries=8, feat_channels=(16, 16, 16), num_layers=2, nhead=2,
                dim_feedforward=32, num_denoising=0, eval_spatial_size=None)  # fmt: skip
    args.update(kw)
    return RTDETRTransformerv2(**args)


def tiny_feats(batch: int = 2, size: tuple[int, int] = (64, 64)) -> list[torch.Tensor]:
    h, w = size
    return [torch.randn(batch, 16, h // s, w // s) for s in (8, 16, 32)]


def sample_targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.4, 0.1, 0.1]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.5, 0.4, 0.3]])},
    ]


# ----------------------------------------------------------------------------- position table
@pytest.mark.parametrize("width,height", [(3, 2), (2, 3), (3, 3)])
def test_sincos_table_by_hand(width: int, height: int) -> None:
    dim = 8  # D = 2: omega = (1, 10000^(-1/2))
    table = sincos_2d_position_embedding(width, height, dim)
    assert table.shape == (1, width * height, dim)
    omega = [1.0, 10000 ** (-0.5)]
    for i in range(width * height):
        a, b = i // height, i % height  # the published index arithmetic
        row = [math.sin(a * w) for w in omega] + [math.cos(a * w) for w in omega]
        row += [math.sin(b * w) for w in omega] + [math.cos(b * w) for w in omega]
        assert torch.allclose(table[0, i], torch.tensor(row), atol=1e-6), i
    if width == height:  # row-major token i = y * W + x: a = y, b = x
        y, x = 2, 1
        assert torch.allclose(table[0, y * width + x, 0], torch.tensor(math.sin(y)))
        assert torch.allclose(table[0, y * width + x, 4], torch.tensor(math.sin(x)))


def test_encoder_eval_table_is_unsaved_buffer() -> None:
    enc = HybridEncoder((16, 16, 16), hidden_dim=16, nhead=2, dim_feedforward=16, eval_spatial_size=(64, 96))
    assert torch.equal(enc.pos_embed2, sincos_2d_position_embedding(3, 2, 16))
    assert "pos_embed2" not in enc.state_dict()


# ----------------------------------------------------------------------------- CCFF
def test_ccff_data_flow_on_tiny_config() -> None:
    torch.manual_seed(0)
    h = 16
    enc = HybridEncoder((8, 12, 24), hidden_dim=h, nhead=2, dim_feedforward=32, expansion=0.5, eval_spatial_size=None)
    enc.eval()
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in ((8, 8), (12, 16), (24, 32))]
    outs = enc(feats)
    assert [tuple(o.shape) for o in outs] == [(2, h, 8, 12), (2, h, 4, 6), (2, h, 2, 3)]

    # Re-computation following the contract's wording, from the submodules.
    proj = [enc.input_proj[i](f) for i, f in enumerate(feats)]
    tokens = proj[2].flatten(2).transpose(1, 2)
    pos = sincos_2d_position_embedding(3, 2, h)
    layer = enc.encoder[0].layers[0]
    attn = layer.self_attn(tokens + pos, tokens + pos, tokens)[0]
    src = layer.norm1(tokens + attn)
    src = layer.norm2(src + layer.linear2(F.gelu(layer.linear1(src))))
    inner = [src.transpose(1, 2).reshape(2, h, 2, 3)]
    for lvl in (2, 1):
        high = enc.lateral_convs[2 - lvl](inner[0])
        inner[0] = high
        up = F.interpolate(high, scale_factor=2, mode="nearest")
        inner.insert(0, enc.fpn_blocks[2 - lvl](torch.cat([up, proj[lvl - 1]], 1)))
    expected = [inner[0]]
    for k in range(2):
        expected.append(enc.pan_blocks[k](torch.cat([enc.downsample_convs[k](expected[-1]), inner[k + 1]], 1)))
    for o, e in zip(outs, expected):
        assert torch.allclose(o, e, atol=1e-5)


def _conv_bn(x, layer, act=None):
    """Functional conv (no bias) + eval BatchNorm (+ activation) with the layer's tensors."""
    conv, bn = layer.conv, layer.norm
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    y = (y - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + 1e-5)
    y = y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return act(y) if act else y


def test_csp_block_against_functional_recomputation() -> None:
    torch.manual_seed(0)
    enc = HybridEncoder((8, 8, 8), hidden_dim=8, nhead=2, dim_feedforward=8, expansion=0.5, eval_spatial_size=None)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    enc.eval()
    block = enc.fpn_blocks[0]
    x = torch.randn(2, 16, 5, 7)
    c1 = _conv_bn(x, block.conv1, F.silu)
    for rep in block.bottlenecks:
        c1 = F.silu(_conv_bn(c1, rep.conv1) + _conv_bn(c1, rep.conv2))
    expected = _conv_bn(c1 + _conv_bn(x, block.conv2, F.silu), block.conv3, F.silu)
    assert torch.allclose(block(x), expected, atol=1e-5)
    assert isinstance(HybridEncoder((8, 8, 8), hidden_dim=8, nhead=2, eval_spatial_size=None).fpn_blocks[0].conv3,
                      nn.Identity)  # fmt: skip


# ----------------------------------------------------------------------------- anchors
def test_anchors_against_brute_force() -> None:
    shapes = [(60, 2), (2, 3), (1, 2)]  # 0.5 / 60 < 0.01: the first and last rows of level 0 are invalid
    anchors, valid = generate_anchors(shapes)
    rows, ok = [], []
    for lvl, (h, w) in enumerate(shapes):
        for y in range(h):
            for x in range(w):
                box = [(x + 0.5) / w, (y + 0.5) / h, 0.05 * 2**lvl, 0.05 * 2**lvl]
                good = all(0.01 < v < 0.99 for v in box)
                ok.append(good)
                rows.append([math.log(v / (1 - v)) if good else math.inf for v in box])
    assert valid.shape == (1, 128, 1) and valid.dtype == torch.bool
    assert valid.view(-1).tolist() == ok
    assert any(ok) and not all(ok)
    assert torch.allclose(anchors[0], torch.tensor(rows), atol=1e-5)


def test_eval_buffers_of_640() -> None:
    dec = tiny_decoder(eval_spatial_size=(640, 640))
    assert dec.anchors.shape == (1, 8400, 4) and dec.valid_mask.shape == (1, 8400, 1)
    anchors, valid = generate_anchors([(80, 80), (40, 40), (20, 20)])
    assert torch.equal(dec.anchors, anchors) and torch.equal(dec.valid_mask, valid)
    # Level 0 of 80x80: size 0.05 is valid; centre x = 0.5/80 < 0.01 is not.
    assert not dec.valid_mask[0, 0, 0] and dec.valid_mask[0, 81, 0]


# ----------------------------------------------------------------------------- decoder
def test_look_forward_twice_gradients() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder(num_layers=2)
    dec.train()
    out = dec(tiny_feats())
    head0 = dec.dec_bbox_head[0].layers[2].weight
    # Layer 1's box refines layer 0's box WITH gradient (head 0 is reached only through that path) ...
    grad = torch.autograd.grad(out["pred_boxes"].sum(), head0, retain_graph=True, allow_unused=True)[0]
    assert grad is not None and grad.abs().sum() > 0
    # ... while layer 1 itself starts from the detached box: its logits do not reach layer 0's box head.
    grad_logits = torch.autograd.grad(out["pred_logits"].sum(), head0, allow_unused=True)[0]
    assert grad_logits is None or grad_logits.abs().sum() == 0


def test_eval_stops_at_eval_idx() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder(num_layers=3, eval_idx=1)
    calls = []
    for i, layer in enumerate(dec.decoder.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    feats = tiny_feats()
    dec.train()
    for m in dec.modules():  # same BN statistics in both passes
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    train_out = dec(feats)
    calls.clear()
    dec.eval()
    with torch.no_grad():
        eval_out = dec(feats)
    assert calls == [0, 1]
    assert sorted(eval_out) == ["pred_boxes", "pred_logits"]
    assert torch.allclose(eval_out["pred_logits"], train_out["aux_outputs"][1]["pred_logits"], atol=1e-6)
    assert torch.allclose(eval_out["pred_boxes"], train_out["aux_outputs"][1]["pred_boxes"], atol=1e-6)


def test_training_outputs_and_query_selection() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder(num_layers=3, num_denoising=10)
    dec.train()
    out = dec(tiny_feats(), sample_targets())
    assert len(out["aux_outputs"]) == 2 and len(out["enc_aux_outputs"]) == 1 and len(out["dn_aux_outputs"]) == 3
    assert out["enc_meta"] == {"class_agnostic": False}
    assert out["pred_logits"].shape == (2, 8, 5)
    n_dn = out["dn_meta"]["dn_num_split"][0]
    assert out["dn_aux_outputs"][0]["pred_boxes"].shape == (2, n_dn, 4)
    # Encoder output: the 8 tokens with the best max-class logit, descending.
    enc_logits = out["enc_aux_outputs"][0]["pred_logits"]
    best = enc_logits.max(-1).values
    assert (best[:, :-1] >= best[:, 1:]).all()


def test_too_few_tokens_and_bad_sizes_are_clear_errors() -> None:
    dec = tiny_decoder(num_queries=100)
    with pytest.raises(ValueError, match="fewer than num_queries"):
        dec(tiny_feats(size=(32, 32)))
    model, _, _ = build(recipe("r18vd", **TINY), 5)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 64, 70))


# ----------------------------------------------------------------------------- denoising
def test_denoising_meta_mask_and_padding() -> None:
    embed = nn.Embedding(81, 8, padding_idx=80)
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([4, 5, 6]), "boxes": torch.rand(3, 2) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1])[:2]},
    ]
    targets[1]["boxes"] = torch.cat([targets[1]["boxes"], torch.full((3, 2), 0.1)], 1)
    content, ref, mask, meta = prepare_for_rtdetr_cdn(targets, 80, 7, embed, 100, 0.5, 1.0)
    groups, n_dn = 33, 198  # 100 // 3 groups of 2 * 3 slots
    assert meta["dn_num_group"] == groups and meta["dn_num_split"] == [n_dn, 7]
    assert meta["dn_positive_idx"][0].tolist() == [g * 6 + j for g in range(groups) for j in range(2)]
    assert meta["dn_positive_idx"][1].tolist() == [g * 6 + j for g in range(groups) for j in range(3)]
    assert content.shape == (2, n_dn, 8) and ref.shape == (2, n_dn, 4)
    expected = torch.tensor(
        [[(i >= n_dn and j < n_dn) or (i < n_dn and j < n_dn and i // 6 != j // 6) for j in range(n_dn + 7)]
         for i in range(n_dn + 7)]
    )  # fmt: skip
    assert torch.equal(mask, expected)
    # Image 0's third slot of every group (positive and negative) is padding: class 80 (zero row), box 0.
    pads = [g * 6 + 2 for g in range(groups)] + [g * 6 + 5 for g in range(groups)]
    assert (content[0, pads] == 0).all()
    assert torch.allclose(ref[0, pads], torch.full((2 * groups, 4), math.log(1e-5)))


def test_denoising_rng_order_and_noise() -> None:
    """Reproduce the queries with the contract's draws in order on the padded [B, n_dn] layout."""
    embed = nn.Embedding(81, 4, padding_idx=80)
    targets = sample_targets()
    torch.manual_seed(3)
    content, ref, _, meta = prepare_for_rtdetr_cdn(targets, 80, 5, embed, 6, 0.5, 1.0)
    groups, max_gt = 3, 2
    labels = torch.full((2, max_gt), 80, dtype=torch.int32)
    boxes = torch.zeros(2, max_gt, 4)
    real = torch.zeros(2, max_gt, dtype=torch.bool)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        labels[b, :n], boxes[b, :n], real[b, :n] = t["labels"].int(), t["boxes"], True
    labels, boxes, real = labels.repeat(1, 2 * groups), boxes.repeat(1, 2 * groups, 1), real.repeat(1, 2 * groups)
    negative = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(groups)[None, :, None].expand(2, -1, 1)
    torch.manual_seed(3)
    flip = torch.rand(labels.shape) < 0.25
    new = torch.randint(0, 80, labels.shape, dtype=torch.int32)
    labels = torch.where(flip & real, new, labels)
    sign = torch.randint(0, 2, boxes.shape).float() * 2 - 1
    m = torch.rand(boxes.shape) + negative
    xyxy = box_cxcywh_to_xyxy(boxes) + sign * m * boxes[..., 2:].repeat(1, 1, 2) / 2
    xyxy = xyxy.clamp(0, 1)
    cxcywh = torch.cat([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], -1)
    expected_ref = torch.log(cxcywh.clamp(0, 1).clamp(min=1e-5) / (1 - cxcywh.clamp(0, 1)).clamp(min=1e-5))
    assert torch.equal(content, embed(labels))
    assert torch.allclose(ref, expected_ref, atol=1e-5)


def test_denoising_without_boxes_has_one_dummy_group() -> None:
    embed = nn.Embedding(81, 4, padding_idx=80)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    content, ref, mask, meta = prepare_for_rtdetr_cdn(empty, 80, 5, embed, 100, 0.5, 1.0)
    assert meta["dn_num_group"] == 1 and meta["dn_num_split"] == [2, 5]
    assert [len(p) for p in meta["dn_positive_idx"]] == [0, 0]
    assert (content == 0).all() and mask.shape == (7, 7)
    boxes = ref.sigmoid()  # positive slot: the dummy 0.5 0.5 0.1 0.1 moved by less than half its size per corner
    assert (box_cxcywh_to_xyxy(boxes[:, 0]) - torch.tensor([0.45, 0.45, 0.55, 0.55])).abs().max() <= 0.05 + 1e-5
    assert prepare_for_rtdetr_cdn(empty, 80, 5, embed, 0) == (None, None, None, None)


# ----------------------------------------------------------------------------- post-process
def test_postprocess_topk_over_flattened_scores_and_label_map() -> None:
    logits = torch.tensor([[[0.0, 3.0], [2.0, -1.0], [1.0, 4.0]]])  # B=1, Q=3, C=2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.25, 1.0, 0.5]]])
    post = RTDETRPostProcessor(num_select=3, category_ids=[7, 9])
    (res,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))  # (h, w)
    # flattened scores: q0c0 0, q0c1 3, q1c0 2, q1c1 -1, q2c0 1, q2c1 4 -> top-3: q2c1, q0c1, q1c0
    assert torch.allclose(res["scores"], torch.tensor([4.0, 3.0, 2.0]).sigmoid())
    assert res["labels"].tolist() == [9, 9, 7]
    assert torch.allclose(res["boxes"], torch.tensor([[0, 0, 200, 50], [80, 40, 120, 60], [0, 0, 100, 100.0]]))
    plain = RTDETRPostProcessor(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 1]]))
    assert plain[0]["labels"].tolist() == [1, 1]
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[11] == 13 and COCO_CATEGORY_IDS[-1] == 90


# ----------------------------------------------------------------------------- init
def test_init_rules() -> None:
    dec = tiny_decoder(hidden_dim=32, nhead=8, num_denoising=4)
    attn = dec.decoder.layers[0].cross_attn
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    assert torch.equal(attn.num_points_scale, torch.full((12,), 0.25))
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    for head in range(8):
        direction = [math.cos(2 * math.pi * head / 8), math.sin(2 * math.pi * head / 8)]
        direction = [v / max(abs(d) for d in direction) for v in direction]
        for level in range(3):
            for point in range(4):
                expected = torch.tensor([v * (point + 1) for v in direction])
                assert torch.allclose(bias[head, level, point], expected, atol=1e-6)
    prior = -math.log(99)
    for head in [dec.enc_score_head, *dec.dec_score_head]:
        assert torch.allclose(head.bias, torch.full_like(head.bias, prior))
    for mlp in [dec.enc_bbox_head, *dec.dec_bbox_head]:
        assert (mlp.layers[-1].weight == 0).all() and (mlp.layers[-1].bias == 0).all()
    assert (dec.denoising_class_embed.weight[5] == 0).all() and dec.denoising_class_embed.weight[0].abs().sum() > 0
    assert tiny_decoder(num_denoising=0).denoising_class_embed is None  # as published: only with denoising


# ----------------------------------------------------------------------------- end to end
def test_tiny_train_step_and_eval_forward() -> None:
    torch.manual_seed(0)
    model, criterion, post = build(recipe("r18vd", **TINY), 5)
    images, targets = torch.rand(2, 3, 64, 64), sample_targets()
    model.train()
    out = model(images, targets)
    losses = criterion(out, targets)
    assert sorted(losses) == sorted(criterion.weight_dict)  # 3 (2L + 1) = 15 keys
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.decoder.dec_bbox_head[0].layers[2].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    results = post["bbox"](out, torch.tensor([[64, 64], [32, 48]]))
    assert len(results) == 2 and results[0]["boxes"].shape == (10, 4)
