"""DINOCriterion against losses computed by hand: denoising slots, _interm copies, zero dn entries, key counts."""

from __future__ import annotations

import pytest
import torch
from helpers import parse_tiny_args
from oracles import focal_term, giou_cxcywh

import models
from models.dino.criterion import DINOCriterion, build_dino_criterion, build_dino_weight_dict, dn_positive_indices
from models.focal_criterion import FocalSetCriterion
from models.matcher import HungarianMatcher

K = 4
ALPHA = 0.25
GROUPS, MAX_GT = 2, 2
PAD = GROUPS * 2 * MAX_GT  # 8 dn slots: per group 2 positives then 2 negatives
MAIN = ("loss_ce", "class_error", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")
UNLOGGED = ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")


class FixedMatcher:
    """Returns the given indices for every output (the dn slots must not go through it)."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(r, dtype=torch.int64), torch.tensor(c, dtype=torch.int64)) for r, c in indices]

    def __call__(self, outputs, targets):
        return self.indices


INDICES = [([2], [0]), ([0, 3], [1, 0])]


def _targets():
    # image 0: one small box (so that DINO's 1e-6 GIoU eps shows); image 1: two boxes
    return [
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.30, 0.40, 0.012, 0.010]])},
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.7, 0.2, 0.2]])},
    ]


def _random_output(queries: int, generator: torch.Generator) -> dict:
    return {
        "pred_logits": torch.randn(2, queries, K, generator=generator) * 2,
        "pred_boxes": torch.rand(2, queries, 4, generator=generator) * 0.3 + torch.tensor([0.2, 0.2, 0.005, 0.005]),
    }


def _outputs(num_aux: int = 1, queries: int = 5, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    outputs = _random_output(queries, generator)
    outputs["aux_outputs"] = [_random_output(queries, generator) for _ in range(num_aux)]
    outputs["interm_outputs"] = _random_output(queries, generator)
    known = _random_output(PAD, generator)
    known["aux_outputs"] = [_random_output(PAD, generator) for _ in range(num_aux)]
    for out in [known, *known["aux_outputs"]]:  # a positive slot overlapping the small box of image 0
        out["pred_boxes"][0, 4] = torch.tensor([0.301, 0.402, 0.011, 0.010])
    outputs["dn_meta"] = {"output_known_lbs_bboxes": known, "pad_size": PAD, "num_dn_group": GROUPS}
    return outputs


def _expected(output, targets, pairs, normaliser: float, eps: float = 1e-6) -> dict:
    """Plain-Python DINO losses of one output; pairs[b] = list of (query, target)."""
    logits, boxes = output["pred_logits"].tolist(), output["pred_boxes"].tolist()
    focal = l1 = xy = hw = giou = cardinality = 0.0
    correct = matched = 0
    for b, target in enumerate(targets):
        labels, tgt_boxes = target["labels"].tolist(), target["boxes"].tolist()
        positive = {(q, labels[t]) for q, t in pairs[b]}
        focal += sum(
            focal_term(x, int((q, c) in positive)) for q, row in enumerate(logits[b]) for c, x in enumerate(row)
        )
        for q, t in pairs[b]:
            diff = [abs(p - g) for p, g in zip(boxes[b][q], tgt_boxes[t])]
            l1, xy, hw = l1 + sum(diff), xy + diff[0] + diff[1], hw + diff[2] + diff[3]
            giou += 1 - giou_cxcywh(boxes[b][q], tgt_boxes[t], eps)
            correct += int(max(range(K), key=lambda c, q=q: logits[b][q][c]) == labels[t])
            matched += 1
        predicted = sum(1 for row in logits[b] if max(range(K), key=lambda c, row=row: row[c]) != K - 1)
        cardinality += abs(predicted - len(labels)) / len(targets)
    return {
        "loss_ce": focal / normaliser,
        "class_error": 100 - (100 * correct / matched if matched else 0),
        "loss_bbox": l1 / normaliser,
        "loss_giou": giou / normaliser,
        "loss_xy": xy / normaliser,
        "loss_hw": hw / normaliser,
        "cardinality_error": cardinality,
    }


def _focal_matcher() -> HungarianMatcher:
    return HungarianMatcher(2, 5, 2, class_cost="focal", giou_eps=1e-6)


def _criterion(matcher=None) -> DINOCriterion:
    matcher = matcher or FixedMatcher(INDICES)
    return DINOCriterion(K, matcher, weight_dict={}, losses=["labels", "boxes", "cardinality"], focal_alpha=ALPHA)


def _empty():
    return {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


def test_dn_slots_are_group_major_positives():
    rows, cols = dn_positive_indices(_targets(), PAD, GROUPS)[1]
    assert rows.tolist() == [0, 1, 4, 5] and cols.tolist() == [0, 1, 0, 1] and rows.dtype == torch.int64
    rows, cols = dn_positive_indices(_targets(), PAD, GROUPS)[0]
    assert rows.tolist() == [0, 4] and cols.tolist() == [0, 0]
    rows, cols = dn_positive_indices([_empty()], PAD, GROUPS)[0]
    assert rows.shape == cols.shape == (0,) and rows.dtype == cols.dtype == torch.int64


def test_dn_losses_equal_hand_computed_values():
    outputs, targets = _outputs(), _targets()
    losses = _criterion()(outputs, targets)
    # positives: image 0 target 0 in slots 0 and 4; image 1 targets 0, 1 in slots 0, 1 and 4, 5
    dn_pairs = [[(0, 0), (4, 0)], [(0, 0), (1, 1), (4, 0), (5, 1)]]
    known = outputs["dn_meta"]["output_known_lbs_bboxes"]
    for suffix, out in (("_dn", known), ("_dn_0", known["aux_outputs"][0])):
        expected = _expected(out, targets, dn_pairs, normaliser=3 * GROUPS)
        for name in UNLOGGED:
            assert losses[f"{name}{suffix}"].item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
        assert f"class_error{suffix}" not in losses
    # the small box makes DINO's eps visible: GIoU without it differs by far more than the tolerance
    no_eps = _expected(known, targets, dn_pairs, normaliser=3 * GROUPS, eps=0.0)["loss_giou"]
    assert abs(no_eps - losses["loss_giou_dn"].item()) > 1e-4 * no_eps


def test_main_aux_and_interm_losses_equal_hand_computed_values():
    outputs, targets = _outputs(), _targets()
    losses = _criterion()(outputs, targets)
    pairs = [list(zip(rows, cols)) for rows, cols in INDICES]
    for suffix, out in (("", outputs), ("_0", outputs["aux_outputs"][0]), ("_interm", outputs["interm_outputs"])):
        expected = _expected(out, targets, pairs, normaliser=3)
        for name in MAIN if suffix == "" else UNLOGGED:
            assert losses[f"{name}{suffix}"].item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert "class_error_interm" not in losses and "class_error_0" not in losses
    assert losses["loss_xy"] + losses["loss_hw"] == pytest.approx(losses["loss_bbox"].item(), rel=1e-6)


def test_logged_parts_have_no_gradient():
    outputs, targets = _outputs(), _targets()
    outputs["pred_boxes"].requires_grad_(True)
    losses = _criterion()(outputs, targets)
    assert losses["loss_bbox"].requires_grad and losses["loss_giou"].requires_grad
    assert not losses["loss_xy"].requires_grad and not losses["loss_hw"].requires_grad


def test_79_loss_entries_for_6_layers_with_and_without_dn():
    targets = _targets()
    with_dn = _criterion(_focal_matcher())(_outputs(num_aux=5, queries=6), targets)
    without = _outputs(num_aux=5, queries=6)
    without["dn_meta"] = None
    without_dn = _criterion(_focal_matcher())(without, targets)
    expected = set(MAIN) | {f"{n}_{s}" for n in UNLOGGED for s in ["dn", "interm"] + [str(i) for i in range(5)]}
    expected |= {f"{n}_dn_{i}" for n in UNLOGGED for i in range(5)}
    assert len(expected) == 79
    assert set(with_dn) == set(without_dn) == expected
    assert all(with_dn[f"loss_ce_dn_{i}"] > 0 for i in range(5))
    assert all(without_dn[f"{n}_dn_{i}"] == 0 for n in UNLOGGED for i in range(5))


@pytest.mark.parametrize("case", ["dn_meta_none", "no_targets", "eval_mode"])
def test_without_a_dn_part_the_dn_entries_are_zero_on_the_outputs_device(case):
    outputs, targets = _outputs(), _targets()
    criterion = _criterion(_focal_matcher())
    if case == "dn_meta_none":
        outputs["dn_meta"] = None
    elif case == "no_targets":
        targets = [_empty(), _empty()]
        outputs["dn_meta"] = {"pad_size": 0, "num_dn_group": 1}  # the model splits off nothing
    else:
        criterion.eval()  # published: dn losses in training only
    losses = criterion(outputs, targets)
    for name in [f"{n}{s}" for n in UNLOGGED for s in ("_dn", "_dn_0")]:
        assert losses[name].item() == 0 and losses[name].device == outputs["pred_logits"].device, name
    if case == "no_targets":
        assert losses["loss_bbox"] == 0 and losses["class_error"] == 100 and losses["loss_ce"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zero_dn_entries_follow_cuda_outputs():
    outputs = _outputs()
    outputs["dn_meta"] = None
    outputs = {k: v if not isinstance(v, torch.Tensor) else v.cuda() for k, v in outputs.items()}
    outputs["aux_outputs"] = [{k: v.cuda() for k, v in a.items()} for a in outputs["aux_outputs"]]
    outputs["interm_outputs"] = {k: v.cuda() for k, v in outputs["interm_outputs"].items()}
    targets = [{k: v.cuda() for k, v in t.items()} for t in _targets()]
    losses = _criterion(_focal_matcher())(outputs, targets)
    assert all(v.device.type == "cuda" for v in losses.values())


def _settings(*flags: str):
    return models.FAMILIES["dino"].make_settings(vars(parse_tiny_args("--model", "dino", *flags)))


def test_dino_weight_dict_has_39_entries_for_6_layers():
    weights = build_dino_weight_dict(_settings("--dec_layers", "6"))
    assert len(weights) == 39
    for suffix in ["", "_dn"] + [f"_{i}" for i in range(5)] + [f"_dn_{i}" for i in range(5)] + ["_interm"]:
        assert (weights[f"loss_ce{suffix}"], weights[f"loss_bbox{suffix}"], weights[f"loss_giou{suffix}"]) == (1, 5, 2)
    assert not any(k.startswith(("loss_xy", "loss_hw", "cardinality", "class_error")) for k in weights)
    scaled = build_dino_weight_dict(_settings("--interm_loss_coef", "0.5"))
    assert (scaled["loss_ce_interm"], scaled["loss_bbox_interm"], scaled["loss_giou_interm"]) == (0.5, 2.5, 1.0)
    no_box = build_dino_weight_dict(_settings("--no_interm_box_loss"))
    assert (no_box["loss_ce_interm"], no_box["loss_bbox_interm"], no_box["loss_giou_interm"]) == (1, 0, 0)
    no_aux = build_dino_weight_dict(_settings("--no_aux_loss"))
    assert no_aux == {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_ce_dn": 1, "loss_bbox_dn": 5,
                      "loss_giou_dn": 2, "loss_ce_interm": 1, "loss_bbox_interm": 5, "loss_giou_interm": 2}  # fmt: skip


def test_build_dino_criterion_reads_the_flags():
    criterion = build_dino_criterion(_settings("--dec_layers", "6"), num_classes=91)
    assert isinstance(criterion, DINOCriterion) and isinstance(criterion, FocalSetCriterion)
    assert criterion.num_classes == 91 and criterion.focal_alpha == 0.25
    assert criterion.losses == ["labels", "boxes", "cardinality"]
    assert criterion.matcher.class_cost == "focal" and criterion.matcher.giou_eps == 1e-6
    assert criterion.giou_eps == 1e-6 and len(criterion.weight_dict) == 39
