"""--spatial_prior gaussian: bias values by hand, attention with a bias vs torch, DETR keys and layer wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.attention import MultiheadAttention
from models.detr.spatial_prior import anchor_boxes, gaussian_attention_bias, token_centers
from util.misc import nested_tensor_from_tensor_list


def test_token_centers_are_relative_to_the_unpadded_image():
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, :, 2:] = True  # image 1: only two valid columns
    mask[1, 1:, :] = True  # ... and one valid row
    centers = token_centers(mask, 2, 2, 4, torch.device("cpu")).view(2, 2, 4, 4)
    assert centers[0, 0, :, 0].tolist() == [0.125, 0.375, 0.625, 0.875]
    assert centers[0, :, 0, 1].tolist() == [0.25, 0.75]
    assert centers[1, 0, :, 0].tolist() == [0.25, 0.75, 1.25, 1.75]  # padding lies beyond 1
    assert centers[1, :, 0, 1].tolist() == [0.5, 1.5]
    assert centers[1, 0, 0, 2:].tolist() == [0.5, 1.0]  # one cell: 1/2 column, 1/1 row


def test_gaussian_bias_by_hand():
    height, width = 2, 4
    centers = token_centers(None, 1, height, width, torch.device("cpu"))
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 1.0], [0.9, 0.1, 0.01, 0.01]]])
    bias = gaussian_attention_bias(boxes, centers)
    assert bias.shape == (1, 2, height * width)
    for q, (cx, cy, w, h) in enumerate(boxes[0].tolist()):
        for row in range(height):
            for col in range(width):
                x, y = (col + 0.5) / width, (row + 0.5) / height
                half_w, half_h = max(w / 2, 1 / width), max(h / 2, 1 / height)  # at least one cell
                expected = -0.5 * (((x - cx) / half_w) ** 2 + ((y - cy) / half_h) ** 2)
                assert math.isclose(bias[0, q, row * width + col].item(), expected, rel_tol=1e-6, abs_tol=1e-6)
    assert bias[0, 0, 1].item() == pytest.approx(-0.5 * (0.5**2 + 0.5**2))  # (0.375, 0.25) vs box centre


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
def test_attention_bias_matches_torch_float_mask(kernel):
    torch.manual_seed(0)
    dim, heads, batch, lq, lk = 16, 4, 2, 3, 5
    ours = MultiheadAttention(dim, heads, kernel=kernel).eval()
    ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    query, key = torch.randn(batch, lq, dim), torch.randn(batch, lk, dim)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    bias = torch.randn(batch, lq, lk) * 3
    out = ours(query, key, key, padding, bias)[0]
    float_mask = bias.masked_fill(padding[:, None, :], float("-inf")).repeat_interleave(heads, dim=0)
    expected = ref(query, key, key, attn_mask=float_mask, need_weights=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ours(query, key, key, padding)[0], atol=1e-3)  # the bias changes the result


def test_detr_with_prior_keeps_the_keys_and_changes_the_outputs(tiny_args):
    import models

    torch.manual_seed(0)
    plain = models.build_model(tiny_args("--dec_layers", "3"))[0].eval()
    prior = models.build_model(tiny_args("--dec_layers", "3", "--spatial_prior", "gaussian"))[0].eval()
    assert plain.state_dict().keys() == prior.state_dict().keys()
    prior.load_state_dict(plain.state_dict())
    images = nested_tensor_from_tensor_list([torch.rand(3, 64, 96), torch.rand(3, 80, 48)])
    with torch.no_grad():
        out_plain, out_prior = plain(images), prior(images)
    assert not torch.allclose(out_prior["pred_boxes"], out_plain["pred_boxes"], atol=1e-4)
    prior.spatial_prior = "none"  # the switch is the only difference
    with torch.no_grad():
        torch.testing.assert_close(prior(images)["pred_boxes"], out_plain["pred_boxes"])


def test_anchor_boxes_are_spread_and_tile_the_image():
    anchors = anchor_boxes(10)
    assert anchors.shape == (10, 4)
    halton = torch.tensor([[0.5, 1 / 3], [0.25, 2 / 3], [0.75, 1 / 9], [0.125, 4 / 9]])  # bases 2 and 3
    torch.testing.assert_close(anchors[:4, :2], halton)
    assert torch.allclose(anchors[:, 2:], torch.full((10, 2), 1 / math.sqrt(10)))
    assert torch.equal(anchor_boxes(100)[:10, :2], anchors[:, :2]) and anchor_boxes(2)[0, 2] == 0.5
    assert len({tuple(row) for row in anchor_boxes(300)[:, :2].tolist()}) == 300


def test_unknown_prior_is_refused(tiny_args):
    import models

    args = tiny_args()
    args.spatial_prior = "cauchy"
    with pytest.raises(ValueError, match="--spatial_prior cauchy"):
        models.build_model(args)


def test_box_refinement_by_hand(tiny_args):
    import models

    model = models.build_model(tiny_args("--dec_layers", "3", "--box_refine"))[0]
    plain = models.build_model(tiny_args("--dec_layers", "3"))[0]
    assert model.state_dict().keys() == plain.state_dict().keys()
    queries = model.num_queries
    hs = torch.randn(3, 2, queries, model.transformer.d_model, requires_grad=True)
    boxes = model.predict_boxes(hs)
    deltas = model.bbox_embed(hs)
    expected, previous = [], anchor_boxes(queries).expand(2, queries, 4)  # the first layer refines the anchors
    for layer in (0, 1, 2):
        previous = previous.clamp(1e-5, 1 - 1e-5)
        previous = (deltas[layer] + torch.log(previous / (1 - previous))).sigmoid()
        expected.append(previous)
    torch.testing.assert_close(boxes, torch.stack(expected))
    boxes[2].sum().backward()  # the previous layers' boxes are detached: no gradient reaches their outputs
    assert hs.grad[:2].abs().max() == 0 and hs.grad[2].abs().max() > 0
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.predict_boxes(hs), deltas.sigmoid())  # published: independent layers


@pytest.mark.parametrize("refine", [False, True])
def test_prior_of_each_layer_comes_from_the_previous_layers_output_boxes(tiny_args, refine):
    import models

    flags = ["--dec_layers", "3", "--spatial_prior", "gaussian"] + (["--box_refine"] if refine else [])
    model = models.build_model(tiny_args(*flags))[0].eval()
    seen: list = []
    for layer in model.transformer.decoder.layers:
        layer.multihead_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[4]))
    images = nested_tensor_from_tensor_list([torch.rand(3, 64, 96), torch.rand(3, 80, 48)])
    with torch.no_grad():
        out = model(images)
    assert len(seen) == 3
    features = model.backbone(images)[0][-1]
    centers = token_centers(features.mask, 2, *features.tensors.shape[-2:], torch.device("cpu"))
    torch.testing.assert_close(
        seen[0], gaussian_attention_bias(anchor_boxes(model.num_queries).expand(2, -1, -1), centers)
    )
    for layer in (1, 2):
        previous = out["aux_outputs"][layer - 1]["pred_boxes"]
        torch.testing.assert_close(seen[layer], gaussian_attention_bias(previous, centers))
