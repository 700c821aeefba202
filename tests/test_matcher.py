"""Hungarian matcher, softmax and focal costs: brute-force optimality, batched == per-image, edge cases, one copy."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
import torch
from helpers import parse_tiny_args
from oracles import giou_xyxy

from models import build_model
from models.matcher import HungarianMatcher, build_matcher, focal_class_cost


def _random_targets(sizes: list[int], num_classes: int, generator: torch.Generator) -> list[dict]:
    targets = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.01
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], dim=1)})
    return targets


def _random_outputs(layers: int, batch: int, queries: int, num_classes: int, generator: torch.Generator) -> list[dict]:
    return [
        {
            "pred_logits": torch.randn(batch, queries, num_classes + 1, generator=generator) * 2,
            "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.1,
        }
        for _ in range(layers)
    ]


def _cost_matrix(logits, boxes, labels, tgt_boxes, w_class, w_bbox, w_giou) -> np.ndarray:
    """Independent float64 cost: w_bbox * L1 - w_class * softmax prob - w_giou * GIoU."""
    logits, boxes = logits.double().numpy(), boxes.double().numpy()
    tgt_boxes = tgt_boxes.double().numpy()
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)

    def xyxy(box):
        return [box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2]

    cost = np.zeros((len(boxes), len(tgt_boxes)))
    for i, box in enumerate(boxes):
        for j, (label, tgt) in enumerate(zip(labels.tolist(), tgt_boxes)):
            l1 = np.abs(box - tgt).sum()
            cost[i, j] = w_bbox * l1 - w_class * prob[i, label] - w_giou * giou_xyxy(xyxy(box), xyxy(tgt))
    return cost


def test_matching_cost_equals_brute_force_optimum():
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    for case in range(25):
        queries = 5
        sizes = [case % 6, (case * 7) % 6]
        outputs = _random_outputs(1, 2, queries, 4, generator)[0]
        targets = _random_targets(sizes, 4, generator)
        for b, (rows, cols) in enumerate(matcher(outputs, targets)):
            cost = _cost_matrix(
                outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"], targets[b]["boxes"], 1, 5, 2
            )
            n = sizes[b]
            assert len(rows) == len(cols) == n and sorted(cols.tolist()) == list(range(n))
            best = min(
                (sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(queries), n)),
                default=0.0,
            )
            assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(best, abs=1e-4)


def test_batched_layers_equal_plain_per_image_matcher():
    generator = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    sizes = [3, 0, 7, 1, 12]
    layers = _random_outputs(3, len(sizes), 15, 6, generator)
    targets = _random_targets(sizes, 6, generator)
    batched = matcher.match_layers(layers, targets)
    assert len(batched) == 3
    for outputs, layer_indices in zip(layers, batched):
        reference = matcher.match_per_image(outputs, targets)
        for (rows, cols), (ref_rows, ref_cols), n in zip(layer_indices, reference, sizes):
            assert rows.dtype == cols.dtype == torch.int64 and len(rows) == n
            assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
            assert torch.equal(rows, rows.sort().values)  # sorted by query, as scipy returns
    single = matcher(layers[1], targets)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, batched[1]))


def test_low_precision_inputs_match_like_their_float32_values():
    generator = torch.Generator().manual_seed(2)
    outputs = _random_outputs(1, 2, 8, 3, generator)[0]
    targets = _random_targets([4, 2], 3, generator)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    matcher = HungarianMatcher(1, 5, 2)
    for got, ref in zip(
        matcher(half, targets), matcher.match_per_image({k: v.float() for k, v in half.items()}, targets)
    ):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_one_host_copy_per_step(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    layers = _random_outputs(6, 4, 10, 5, generator)
    targets = _random_targets([2, 5, 0, 3], 5, generator)
    calls = {"cpu": 0, "item": 0, "tolist": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    HungarianMatcher(1, 5, 2).match_layers(layers, targets)
    assert calls == {"cpu": 1, "item": 0, "tolist": 0}


def test_images_without_targets_give_empty_int64_indices():
    outputs = _random_outputs(1, 2, 4, 3, torch.Generator().manual_seed(4))[0]
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for rows, cols in HungarianMatcher()(outputs, [empty, empty]):
        assert rows.shape == cols.shape == (0,) and rows.dtype == cols.dtype == torch.int64


def test_more_targets_than_queries_names_both_counts():
    generator = torch.Generator().manual_seed(5)
    outputs = _random_outputs(1, 2, 3, 3, generator)[0]
    targets = _random_targets([2, 5], 3, generator)
    with pytest.raises(ValueError, match=r"image 1 has 5 target boxes but the model has only 3 queries"):
        HungarianMatcher()(outputs, targets)


@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_raise_clear_error(key, bad):
    generator = torch.Generator().manual_seed(6)
    outputs = _random_outputs(1, 2, 4, 3, generator)[0]
    outputs[key][1, 2, 0] = bad
    with pytest.raises(ValueError, match="predictions contain NaN or inf"):
        HungarianMatcher()(outputs, _random_targets([1, 2], 3, generator))


def test_bad_targets_raise_clear_errors():
    generator = torch.Generator().manual_seed(7)
    outputs = _random_outputs(1, 1, 4, 3, generator)[0]
    inverted = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}
    with pytest.raises(ValueError, match="negative width"):
        HungarianMatcher()(outputs, [inverted])
    out_of_range = {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]])}
    with pytest.raises(ValueError, match="num_classes"):
        HungarianMatcher()(outputs, [out_of_range])
    with pytest.raises(ValueError, match="target dicts"):
        HungarianMatcher()(outputs, [out_of_range, out_of_range])
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)


def test_build_matcher_uses_set_cost_flags():
    matcher = build_matcher(parse_tiny_args("--set_cost_class", "3", "--set_cost_bbox", "4", "--set_cost_giou", "0.5"))
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (3, 4, 0.5)


def _focal_cost_matrix(logits, boxes, labels, tgt_boxes, w_class, w_bbox, w_giou, eps=None) -> np.ndarray:
    """Independent float64 focal cost: alpha 0.25, gamma 2 at the target class; DINO's GIoU when eps is given."""
    prob = 1 / (1 + np.exp(-logits.double().numpy()))
    boxes, tgt_boxes = boxes.double().numpy(), tgt_boxes.double().numpy()

    def xyxy(box):
        return [box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2]

    def giou(a, b):
        a, b = xyxy(a), xyxy(b)
        if eps is None:
            return giou_xyxy(a, b)
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        return inter / (union + eps) - (enclosing - union) / (enclosing + eps)

    cost = np.zeros((len(boxes), len(tgt_boxes)))
    for i, box in enumerate(boxes):
        for j, (label, tgt) in enumerate(zip(labels.tolist(), tgt_boxes)):
            p = prob[i, label]
            focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p**2 * -np.log(1 - p + 1e-8)
            cost[i, j] = w_bbox * np.abs(box - tgt).sum() + w_class * focal - w_giou * giou(box, tgt)
    return cost


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_focal_matching_cost_equals_brute_force_optimum(eps):
    generator = torch.Generator().manual_seed(10)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, class_cost="focal", giou_eps=eps)
    for case in range(20):
        queries, sizes = 5, [case % 5, (case * 3) % 6]
        outputs = _random_outputs(1, 2, queries, 4, generator)[0]
        outputs["pred_logits"] = outputs["pred_logits"][..., :4]  # K logits, no "no object"
        outputs["pred_boxes"][..., 2:] *= 0.05  # small boxes make the eps matter
        targets = _random_targets(sizes, 4, generator)
        targets[0]["labels"][:1] = 3  # the last class is a real class
        for b, (rows, cols) in enumerate(matcher(outputs, targets)):
            cost = _focal_cost_matrix(
                outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"], targets[b]["boxes"],
                2, 5, 2, eps,
            )  # fmt: skip
            n = sizes[b]
            assert len(rows) == n and sorted(cols.tolist()) == list(range(n))
            best = min(
                (sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(queries), n)),
                default=0.0,
            )
            assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(best, abs=1e-4)


def test_focal_cost_hand_values_and_dino_eps_changes_the_cost():
    logits = torch.tensor([0.0, 2.0, -3.0])
    p = torch.sigmoid(logits).double()
    expected = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
    torch.testing.assert_close(focal_class_cost(logits).double(), expected, rtol=1e-6, atol=1e-7)
    outputs = {"pred_logits": torch.zeros(1, 1, 2), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.01, 0.01]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.502, 0.5, 0.01, 0.01]])}]
    detr = HungarianMatcher(0, 0, 1, class_cost="focal")._cost(
        outputs["pred_logits"][None], outputs["pred_boxes"][None], targets[0]["labels"][None], targets[0]["boxes"][None]
    )
    dino = HungarianMatcher(0, 0, 1, class_cost="focal", giou_eps=1e-6)._cost(
        outputs["pred_logits"][None], outputs["pred_boxes"][None], targets[0]["labels"][None], targets[0]["boxes"][None]
    )
    # inter 0.8e-4, union 1.2e-4, enclosing 1.2e-4: GIoU 2/3 without eps
    assert -detr.item() == pytest.approx(2 / 3, rel=1e-5)
    assert -dino.item() == pytest.approx(0.8e-4 / (1.2e-4 + 1e-6), rel=1e-4)  # enclosing = union
    assert abs(detr.item() - dino.item()) > 1e-3


def test_batched_focal_outputs_with_different_query_counts_equal_per_image_matching(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, class_cost="focal", giou_eps=1e-6)
    sizes = [3, 0, 6]
    outputs = [_random_outputs(1, 3, q, 4, generator)[0] for q in (8, 20, 8, 6)]
    for out in outputs:
        out["pred_logits"] = out["pred_logits"][..., :4]
    targets = _random_targets(sizes, 4, generator)
    reference = [matcher.match_per_image(out, targets) for out in outputs]
    cpu_calls = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: cpu_calls.append(1) or original(self, *a, **k))
    batched = matcher.match_layers(outputs, targets)
    assert len(cpu_calls) == 1  # still a single device-to-host copy
    assert len(batched) == 4
    for layer, ref in zip(batched, reference):
        for (rows, cols), (ref_rows, ref_cols) in zip(layer, ref):
            assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    assert matcher.match_layers([], targets) == []
    with pytest.raises(ValueError, match="image 2 has 6 target boxes but the model has only 5 queries"):
        matcher.match_layers([outputs[0], _random_outputs(1, 3, 5, 3, generator)[0]], targets)


def test_focal_labels_may_use_every_logit_but_not_beyond():
    generator = torch.Generator().manual_seed(12)
    outputs = {"pred_logits": torch.randn(1, 4, 3, generator=generator), "pred_boxes": torch.rand(1, 4, 4) * 0.5}
    target = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]])}
    assert len(HungarianMatcher(class_cost="focal")(outputs, [target])[0][0]) == 1
    with pytest.raises(ValueError, match=r"\[0, 2\)"):  # softmax: the last logit is "no object"
        HungarianMatcher()(outputs, [target])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        HungarianMatcher(class_cost="focal")(outputs, [{**target, "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="sigmoid")


@pytest.mark.parametrize(
    ("model", "class_cost", "eps"),
    [("detr", "softmax", None), ("deformable_detr", "focal", None), ("dino", "focal", 1e-6)],
)
def test_each_family_builds_its_matching_cost(model, class_cost, eps):
    matcher = build_model(parse_tiny_args("--model", model, "--dn_number", "4"))[1].matcher
    assert (matcher.class_cost, matcher.giou_eps) == (class_cost, eps)
    expected_class = 1 if model == "detr" else 2
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (expected_class, 5, 2)


@pytest.mark.parametrize(("model", "alpha"), [("deformable_detr", 0.25), ("dino", 0.4)])
def test_focal_matching_alpha_follows_focal_alpha_for_dino_only(model, alpha):
    """Published: DINO's matcher reads --focal_alpha, Deformable DETR's keeps 0.25 (DESIGN_DINO / _DEFORMABLE)."""
    matcher = build_model(parse_tiny_args("--model", model, "--focal_alpha", "0.4", "--dn_number", "4"))[1].matcher
    assert matcher.focal_alpha == alpha
    logits = torch.tensor([[[0.3, -1.2, 2.0]]])
    p = torch.sigmoid(logits).double()
    by_hand = alpha * (1 - p) ** 2 * -(p + 1e-8).log() - (1 - alpha) * p**2 * -(1 - p + 1e-8).log()
    torch.testing.assert_close(matcher._class_cost(logits).double(), by_hand, rtol=1e-6, atol=1e-7)


def test_build_matcher_without_a_model_field_is_detr():
    matcher = build_matcher(argparse.Namespace(set_cost_class=1, set_cost_bbox=5, set_cost_giou=2))
    assert matcher.class_cost == "softmax" and matcher.giou_eps is None
