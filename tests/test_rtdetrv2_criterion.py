"""RT-DETRv2 criterion (VFL, boxes, aux/enc/dn terms, weight_dict) and its focal-cost matcher, against hand values
and plain-Python references (DESIGN_RTDETR "Matcher, criterion, post-processor")."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from oracles import cxcywh_to_xyxy, giou_cxcywh

from models.matcher import HungarianMatcher, focal_class_cost
from models.rtdetrv2 import RTDETRCriterionv2, build_criterion, recipe, rtdetr_weight_dict


def iou_cxcywh(a, b) -> float:
    a, b = cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def vfl_reference(logits, boxes, targets, pairs, num_boxes, alpha=0.75, gamma=2.0) -> float:
    """Plain Python: t = one-hot * IoU at matched (query, class); w = alpha p^gamma (1 - onehot) + t; BCE * w."""
    total = 0.0
    for b, image in enumerate(logits):
        matched = {q: (targets[b]["labels"][j], iou_cxcywh(boxes[b][q], targets[b]["boxes"][j])) for q, j in pairs[b]}
        for q, row in enumerate(image):
            for c, x in enumerate(row):
                onehot = 1.0 if q in matched and matched[q][0] == c else 0.0
                t = onehot * (matched[q][1] if q in matched else 0.0)
                p = sigmoid(x)
                w = alpha * p**gamma * (1 - onehot) + t
                total += -w * (t * math.log(p) + (1 - t) * math.log(1 - p))
    return total / num_boxes


def make_case():
    logits = [
        [[0.3, -1.2, 2.0], [-0.5, 0.7, -2.0], [1.1, 0.0, -0.3]],
        [[0.2, 0.4, -0.6], [-1.0, 1.5, 0.9], [0.0, 0.1, 0.2]],
    ]
    boxes = [
        [[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.5]],
        [[0.4, 0.4, 0.4, 0.4], [0.6, 0.7, 0.3, 0.2], [0.5, 0.5, 0.9, 0.9]],
    ]
    targets = [
        {"labels": [2, 0], "boxes": [[0.45, 0.55, 0.3, 0.3], [0.25, 0.3, 0.25, 0.15]]},
        {"labels": [1], "boxes": [[0.6, 0.65, 0.3, 0.3]]},
    ]
    return logits, boxes, targets


def as_tensors(targets):
    return [{"labels": torch.tensor(t["labels"]), "boxes": torch.tensor(t["boxes"])} for t in targets]


def test_vfl_and_box_losses_against_plain_python() -> None:
    logits, boxes, targets = make_case()
    pairs = [[(0, 0), (1, 1)], [(1, 0)]]
    indices = [(torch.tensor([q for q, _ in p]), torch.tensor([j for _, j in p])) for p in pairs]
    crit = build_criterion(recipe("r50vd"), 3)
    out = {"pred_logits": torch.tensor(logits), "pred_boxes": torch.tensor(boxes)}
    vfl = crit.loss_vfl(out, as_tensors(targets), indices, num_boxes=3.0)
    assert vfl.item() == pytest.approx(vfl_reference(logits, boxes, targets, pairs, 3.0), rel=1e-5)
    l1, giou = crit.loss_boxes(out, as_tensors(targets), indices, num_boxes=3.0)
    pairs_boxes = [(boxes[b][q], targets[b]["boxes"][j]) for b, p in enumerate(pairs) for q, j in p]
    assert l1.item() == pytest.approx(sum(abs(u - v) for a, t in pairs_boxes for u, v in zip(a, t)) / 3, rel=1e-5)
    assert giou.item() == pytest.approx(sum(1 - giou_cxcywh(a, t) for a, t in pairs_boxes) / 3, rel=1e-5)


def test_vfl_iou_target_is_detached() -> None:
    logits, boxes, targets = make_case()
    pred_boxes = torch.tensor(boxes, requires_grad=True)
    indices = [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([1]), torch.tensor([0]))]
    crit = build_criterion(recipe("r50vd"), 3)
    pred_logits = torch.tensor(logits, requires_grad=True)
    vfl = crit.loss_vfl({"pred_logits": pred_logits, "pred_boxes": pred_boxes}, as_tensors(targets), indices, 2.0)
    grad_logits, grad_boxes = torch.autograd.grad(vfl, [pred_logits, pred_boxes], allow_unused=True)
    assert grad_boxes is None and grad_logits.abs().sum() > 0


def focal_cost_reference(x: float, alpha: float = 0.25) -> float:
    p = sigmoid(x)
    return alpha * (1 - p) ** 2 * -math.log(p + 1e-8) - (1 - alpha) * p**2 * -math.log(1 - p + 1e-8)


def test_matcher_focal_cost_and_assignment_against_brute_force() -> None:
    logits, boxes, targets = make_case()
    matcher = build_criterion(recipe("r50vd"), 3).matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2, 5, 2)
    assert focal_class_cost(torch.tensor([0.7]))[0].item() == pytest.approx(focal_cost_reference(0.7), rel=1e-5)
    assert focal_class_cost(torch.tensor([0.7]), alpha=0.4)[0].item() == pytest.approx(
        focal_cost_reference(0.7, 0.4), rel=1e-5
    )
    out = {"pred_logits": torch.tensor(logits), "pred_boxes": torch.tensor(boxes)}
    indices = matcher(out, as_tensors(targets))
    for b, (src, tgt) in enumerate(indices):
        t = targets[b]

        def cost(q, j, b=b, t=t):
            return (
                5 * sum(abs(u - v) for u, v in zip(boxes[b][q], t["boxes"][j]))
                + 2 * focal_cost_reference(logits[b][q][t["labels"][j]])
                - 2 * giou_cxcywh(boxes[b][q], t["boxes"][j])
            )

        n = len(t["labels"])
        best = min(itertools.permutations(range(3), n), key=lambda qs: sum(cost(q, j) for j, q in enumerate(qs)))
        assert sorted(zip(src.tolist(), tgt.tolist())) == sorted((q, j) for j, q in enumerate(best))
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64


def test_matcher_default_alpha_unchanged() -> None:
    m = HungarianMatcher(2, 5, 2, class_cost="focal")
    assert m.focal_alpha == 0.25 and m.giou_eps is None


def test_weight_dict_keys_and_weighted_sum() -> None:
    weights = rtdetr_weight_dict(3)
    assert len(weights) == 3 * (2 * 3 + 1)
    assert weights["loss_vfl_aux_1"] == 1 and weights["loss_bbox_enc_0"] == 5 and weights["loss_giou_dn_2"] == 2
    assert "loss_vfl_aux_2" not in weights and "loss_vfl_dn_3" not in weights


def dn_outputs(q: int = 3, n_dn: int = 8, layers: int = 2, k: int = 3):
    torch.manual_seed(0)

    def one(n):
        return {"pred_logits": torch.randn(2, n, k), "pred_boxes": torch.rand(2, n, 2) * 0.4 + 0.3}

    def with_wh(o):
        o["pred_boxes"] = torch.cat([o["pred_boxes"], torch.full_like(o["pred_boxes"], 0.2)], -1)
        return o

    out = with_wh(one(q))
    out["aux_outputs"] = [with_wh(one(q)) for _ in range(layers - 1)]
    out["enc_aux_outputs"] = [with_wh(one(q))]
    out["enc_meta"] = {"class_agnostic": False}
    out["dn_aux_outputs"] = [with_wh(one(n_dn)) for _ in range(layers)]
    # 2 groups of 2 * max_gt (2) slots; image 0 has 2 targets, image 1 has 1.
    out["dn_meta"] = {"dn_positive_idx": [torch.tensor([0, 1, 4, 5]), torch.tensor([0, 4])], "dn_num_group": 2,
                      "dn_num_split": [n_dn, q]}  # fmt: skip
    return out


def test_full_loss_dict_and_dn_pairing() -> None:
    _, _, targets = make_case()
    targets = as_tensors(targets)
    crit = build_criterion(recipe("r50vd", dec_layers=2), 3)
    out = dn_outputs()
    losses = crit(out, targets)
    assert sorted(losses) == sorted(crit.weight_dict)
    # dn layer 1: positives paired with targets 0..n-1 in every group, normalised by num_boxes * groups = 3 * 2.
    dn = out["dn_aux_outputs"][1]["pred_boxes"]
    pairs = [(0, 0, 0), (0, 1, 1), (0, 4, 0), (0, 5, 1), (1, 0, 0), (1, 4, 0)]
    l1 = sum((dn[b, s] - targets[b]["boxes"][j]).abs().sum().item() for b, s, j in pairs) / 6
    assert losses["loss_bbox_dn_1"].item() == pytest.approx(l1, rel=1e-5)
    # Main output: its own Hungarian matching (as matcher output), num_boxes 3.
    indices = crit.matcher(out, targets)
    assert losses["loss_vfl"].item() == pytest.approx(crit.loss_vfl(out, targets, indices, 3.0).item(), rel=1e-6)


def test_no_targets_is_finite() -> None:
    crit = build_criterion(recipe("r50vd", dec_layers=2), 3)
    out = dn_outputs(n_dn=2)
    out["dn_meta"] = {"dn_positive_idx": [torch.zeros(0, dtype=torch.int64)] * 2, "dn_num_group": 1,
                      "dn_num_split": [2, 3]}  # fmt: skip
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = crit(out, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_vfl"] > 0  # negatives only, num_boxes clamped to 1


def test_criterion_attributes() -> None:
    crit = build_criterion(recipe("r18vd"), 7)
    assert isinstance(crit, RTDETRCriterionv2) and crit.num_classes == 7 and crit.alpha == 0.75
    assert len(crit.weight_dict) == 3 * (2 * 3 + 1)
