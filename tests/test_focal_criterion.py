"""FocalSetCriterion (Deformable DETR) against focal losses computed element by element in plain Python."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import parse_tiny_args
from oracles import focal_term, giou_cxcywh
from torchvision.ops import sigmoid_focal_loss as tv_focal

import models
from models.criterion import SetCriterion
from models.deformable_detr.build import build_deformable_criterion, build_deformable_weight_dict
from models.focal_criterion import FocalSetCriterion
from models.matcher import HungarianMatcher

K = 3  # classes; no "no object" logit
ALPHA = 0.3  # not the matcher's fixed 0.25, so that a mix-up shows


class FixedMatcher:
    """Returns the given indices for every output (keeps the loss tests independent of the matcher)."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(r, dtype=torch.int64), torch.tensor(c, dtype=torch.int64)) for r, c in indices]

    def __call__(self, outputs, targets):
        return self.indices


INDICES = [([0, 2], [1, 0]), ([1], [0])]


def _case():
    logits = torch.tensor(
        [
            [[0.2, -1.0, 2.5], [0.0, 0.3, -0.2], [1.2, 0.4, -0.3]],
            [[-0.5, 0.4, 0.2], [0.3, 0.2, 1.1], [0.9, 0.0, -2.0]],
        ]
    )
    boxes = torch.tensor(
        [
            [[0.25, 0.35, 0.2, 0.1], [0.5, 0.5, 0.1, 0.1], [0.45, 0.55, 0.3, 0.5]],
            [[0.1, 0.1, 0.1, 0.1], [0.7, 0.6, 0.2, 0.4], [0.3, 0.3, 0.3, 0.3]],
        ]
    )
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.3, 0.2, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.5]])},
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def _expected(outputs, targets, indices, alpha=ALPHA):
    """Plain-Python Deformable DETR losses for given matches."""
    logits, boxes = outputs["pred_logits"].tolist(), outputs["pred_boxes"].tolist()
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    focal = l1 = giou = cardinality = 0.0
    correct = matched = 0
    for b, (rows, cols) in enumerate(indices):
        labels, tgt_boxes = targets[b]["labels"].tolist(), targets[b]["boxes"].tolist()
        assigned = {q: labels[t] for q, t in zip(rows, cols)}
        for q, row in enumerate(logits[b]):
            focal += sum(focal_term(x, int(assigned.get(q) == c), alpha) for c, x in enumerate(row))
        for q, t in zip(rows, cols):
            l1 += sum(abs(p - g) for p, g in zip(boxes[b][q], tgt_boxes[t]))
            giou += 1 - giou_cxcywh(boxes[b][q], tgt_boxes[t])
            correct += int(max(range(K), key=lambda c, q=q: logits[b][q][c]) == labels[t])
            matched += 1
        # published leftover: "not the last class" counts as a detection
        predicted = sum(1 for row in logits[b] if max(range(K), key=lambda c, row=row: row[c]) != K - 1)
        cardinality += abs(predicted - len(labels)) / len(indices)
    return {
        "loss_ce": focal / num_boxes,
        "loss_bbox": l1 / num_boxes,
        "loss_giou": giou / num_boxes,
        "class_error": 100 - (100 * correct / matched if matched else 0),
        "cardinality_error": cardinality,
    }


def _criterion(matcher, losses=("labels", "boxes", "cardinality"), alpha=ALPHA):
    return FocalSetCriterion(K, matcher, weight_dict={}, losses=list(losses), focal_alpha=alpha)


def _focal_matcher():
    return HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, class_cost="focal")


def _brute_force_match(logits, boxes, labels, tgt_boxes):
    """Optimal assignment of one image by enumerating permutations of the plain-Python focal matching cost."""

    def cost(q, j):
        p = 1 / (1 + math.exp(-logits[q][labels[j]]))
        cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
        l1 = sum(abs(a - b) for a, b in zip(boxes[q], tgt_boxes[j]))
        return 5 * l1 + 2 * cls - 2 * giou_cxcywh(boxes[q], tgt_boxes[j])

    n = len(labels)
    perms = itertools.permutations(range(len(boxes)), n)
    best = min(perms, key=lambda perm: sum(cost(q, j) for j, q in enumerate(perm)))
    pairs = sorted(zip(best, range(n)))
    return [q for q, _ in pairs], [j for _, j in pairs]


def test_hand_computed_focal_losses_on_a_two_image_case():
    outputs, targets = _case()
    losses = _criterion(FixedMatcher(INDICES))(outputs, targets)
    expected = _expected(outputs, targets, INDICES)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert 0 < expected["class_error"] < 100 and expected["cardinality_error"] > 0
    assert isinstance(_criterion(FixedMatcher(INDICES)), SetCriterion)
    assert not hasattr(_criterion(FixedMatcher(INDICES)), "empty_weight")


def test_loss_ce_reproduces_the_published_reduction_bit_for_bit():
    generator = torch.Generator().manual_seed(1)  # a case where the two reduction orders round differently
    logits = torch.randn(2, 7, K, generator=generator) * 3
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, 7, 4, generator=generator) * 0.3 + 0.2}
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.rand(2, 4) * 0.2 + 0.3}]
    targets.append({"labels": torch.tensor([1]), "boxes": torch.rand(1, 4) * 0.2 + 0.3})
    indices = [([5, 1], [0, 1]), ([3], [0])]
    onehot = torch.zeros(2, 7, K)
    onehot[0, 5, 2] = onehot[0, 1, 0] = onehot[1, 3, 1] = 1
    # mean over queries, sum over batch and classes, / num_boxes, x Q
    published = tv_focal(logits, onehot, alpha=ALPHA, gamma=2, reduction="none").mean(1).sum() / 3.0 * 7
    loss = _criterion(FixedMatcher(indices), losses=("labels",))(outputs, targets)["loss_ce"]
    assert torch.equal(loss, published)
    plain_sum = tv_focal(logits, onehot, alpha=ALPHA, gamma=2, reduction="none").sum() / 3.0
    assert not torch.equal(loss, plain_sum) and loss.item() == pytest.approx(plain_sum.item(), rel=1e-6)


def test_with_the_real_matcher_losses_match_brute_force_assignment():
    outputs, targets = _case()
    losses = _criterion(_focal_matcher())(outputs, targets)
    indices = [
        _brute_force_match(outputs["pred_logits"][b].tolist(), outputs["pred_boxes"][b].tolist(),
                           t["labels"].tolist(), t["boxes"].tolist())
        for b, t in enumerate(targets)
    ]  # fmt: skip
    for name, value in _expected(outputs, targets, indices).items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_aux_outputs_get_suffixed_copies_without_class_error():
    outputs, targets = _case()
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"] * 0.5, "pred_boxes": outputs["pred_boxes"]},
        {"pred_logits": -outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"].flip(1)},
    ]
    losses = _criterion(_focal_matcher())(outputs, targets)
    main = {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}
    aux = {f"{n}_{i}" for i in range(2) for n in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")}
    assert set(losses) == main | aux
    for i, out in enumerate(outputs["aux_outputs"]):
        indices = [
            _brute_force_match(out["pred_logits"][b].tolist(), out["pred_boxes"][b].tolist(),
                               t["labels"].tolist(), t["boxes"].tolist())
            for b, t in enumerate(targets)
        ]  # fmt: skip
        expected = _expected(out, targets, indices)
        for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert losses[f"{name}_{i}"].item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_enc_outputs_are_matched_and_classified_with_every_label_zero():
    outputs, targets = _case()
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    # 5 encoder tokens: tokens 1 and 3 have the target's box; token 1 is sure of class 0, token 3 of class 2.
    enc_logits = torch.full((2, 5, K), -4.0)
    enc_logits[:, 1, 0] = 4.0
    enc_logits[:, 3, 2] = 3.0
    enc_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1]]).repeat(2, 5, 1)
    enc_boxes[:, 1] = enc_boxes[:, 3] = torch.tensor([0.5, 0.5, 0.2, 0.2])
    outputs["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
    losses = _criterion(_focal_matcher())(outputs, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"} <= set(losses)
    assert "class_error_enc" not in losses
    zero_labels = [{**t, "labels": torch.zeros(1, dtype=torch.int64)} for t in targets]
    expected = _expected(outputs["enc_outputs"], zero_labels, [([1], [0]), ([1], [0])])
    assert losses["loss_ce_enc"].item() == pytest.approx(expected["loss_ce"], rel=1e-5)
    # with the real label in the matching and/or the classification, the loss is far off
    for labels, query in ((zero_labels, 3), (targets, 1), (targets, 3)):
        other = _expected(outputs["enc_outputs"], labels, [([query], [0]), ([query], [0])])
        assert abs(other["loss_ce"] - expected["loss_ce"]) > 0.1 * expected["loss_ce"]
    assert losses["loss_bbox_enc"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["cardinality_error_enc"].item() == pytest.approx(expected["cardinality_error"])


def test_no_targets_give_background_focal_loss_and_zero_box_losses():
    outputs, _ = _case()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    outputs["enc_outputs"] = {"pred_logits": outputs["pred_logits"] + 1, "pred_boxes": outputs["pred_boxes"]}
    losses = _criterion(_focal_matcher())(outputs, [empty, empty])
    expected = _expected(outputs, [empty, empty], [([], []), ([], [])])
    assert losses["loss_ce"].item() == pytest.approx(expected["loss_ce"], rel=1e-5)
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_bbox_enc"] == 0
    assert losses["class_error"] == 100


def test_losses_are_float32_under_autocast():
    outputs, targets = _case()
    low = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion(FixedMatcher(INDICES))(low, targets)
    expected = _criterion(FixedMatcher(INDICES))({k: v.float() for k, v in low.items()}, targets)
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expected[name])


def _settings(*flags: str):
    return models.FAMILIES["deformable_detr"].make_settings(vars(parse_tiny_args("--model", "deformable_detr", *flags)))


def test_deformable_weight_dict_has_21_entries_for_6_layers():
    weights = build_deformable_weight_dict(_settings("--dec_layers", "6"))
    assert len(weights) == 21
    for suffix in ["", "_enc"] + [f"_{i}" for i in range(5)]:
        assert weights[f"loss_ce{suffix}"] == 2 and weights[f"loss_bbox{suffix}"] == 5
        assert weights[f"loss_giou{suffix}"] == 2
    assert len(build_deformable_weight_dict(_settings("--no_aux_loss"))) == 3


def test_build_deformable_criterion_reads_the_flags():
    criterion = build_deformable_criterion(_settings("--focal_alpha", "0.4", "--cls_loss_coef", "3"), num_classes=91)
    assert isinstance(criterion, FocalSetCriterion)
    assert criterion.num_classes == 91 and criterion.focal_alpha == 0.4
    assert criterion.losses == ["labels", "boxes", "cardinality"]
    assert criterion.matcher.class_cost == "focal" and criterion.matcher.cost_class == 2
    assert criterion.weight_dict["loss_ce"] == 3 and criterion.weight_dict["loss_ce_enc"] == 3
