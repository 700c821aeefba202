"""SetCriterion against losses computed independently by hand on small two-image cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from oracles import giou_cxcywh

from models.criterion import SetCriterion
from models.matcher import HungarianMatcher

NUM_CLASSES = 3  # logits have 4 entries; index 3 is "no object"
EOS = 0.1


class FixedMatcher:
    """Returns the given indices for every layer (keeps the loss test independent of the matcher)."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(r), torch.tensor(c)) for r, c in indices]

    def __call__(self, outputs, targets):
        return self.indices


INDICES = [([0, 2], [1, 0]), ([1], [0])]  # image 0: query 0 -> target 1, query 2 -> target 0


def _case():
    logits = torch.tensor(
        [
            [[0.2, -1.0, 2.5, 0.1], [0.0, 0.3, -0.2, 1.5], [1.2, 0.4, -0.3, 0.9]],
            [[-0.5, 0.1, 0.2, 2.0], [0.3, 0.2, 1.1, -0.4], [0.9, 0.0, 0.0, 0.5]],
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


def _expected(outputs, targets, indices):
    """Plain-Python losses: weighted-mean CE, L1 and 1 - GIoU summed over matches / number of boxes."""
    logits, boxes = outputs["pred_logits"].tolist(), outputs["pred_boxes"].tolist()
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    ce_sum = weight_sum = l1 = giou = 0.0
    correct = matched = 0
    cardinality = 0.0
    for b, (rows, cols) in enumerate(indices):
        labels = targets[b]["labels"].tolist()
        tgt_boxes = targets[b]["boxes"].tolist()
        assigned = {q: labels[t] for q, t in zip(rows, cols)}
        for q, row in enumerate(logits[b]):
            cls = assigned.get(q, NUM_CLASSES)
            log_norm = math.log(sum(math.exp(v) for v in row))
            weight = EOS if cls == NUM_CLASSES else 1.0
            ce_sum += weight * (log_norm - row[cls])
            weight_sum += weight
        for q, t in zip(rows, cols):
            l1 += sum(abs(p - g) for p, g in zip(boxes[b][q], tgt_boxes[t]))
            giou += 1 - giou_cxcywh(boxes[b][q], tgt_boxes[t])
            correct += int(max(range(4), key=lambda c, q=q: logits[b][q][c]) == labels[t])
            matched += 1
        predicted = sum(1 for row in logits[b] if max(range(4), key=lambda c, row=row: row[c]) != NUM_CLASSES)
        cardinality += abs(predicted - len(labels)) / len(indices)
    return {
        "loss_ce": ce_sum / weight_sum,
        "loss_bbox": l1 / num_boxes,
        "loss_giou": giou / num_boxes,
        "class_error": 100 - (100 * correct / matched if matched else 0),
        "cardinality_error": cardinality,
    }


def _criterion(matcher, losses=("labels", "boxes", "cardinality")):
    return SetCriterion(NUM_CLASSES, matcher, weight_dict={}, eos_coef=EOS, losses=list(losses))


def test_hand_built_two_image_case():
    outputs, targets = _case()
    losses = _criterion(FixedMatcher(INDICES))(outputs, targets)
    expected = _expected(outputs, targets, INDICES)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert 0 < expected["class_error"] < 100  # the case exercises both right and wrong classes


def test_real_matcher_on_an_unambiguous_case_gives_the_same_losses():
    outputs, targets = _case()
    for b, (rows, cols) in enumerate(INDICES):  # make the fixed assignment the clear optimum
        for q, t in zip(rows, cols):
            outputs["pred_boxes"][b, q] = targets[b]["boxes"][t] + 0.01
            outputs["pred_logits"][b, q, targets[b]["labels"][t]] += 5
    fixed = _criterion(FixedMatcher(INDICES))(outputs, targets)
    real = _criterion(HungarianMatcher(1, 5, 2))(outputs, targets)
    for name in fixed:
        torch.testing.assert_close(real[name], fixed[name])


def test_aux_outputs_get_suffixed_copies_without_logging_losses():
    outputs, targets = _case()
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"] * 0.5, "pred_boxes": outputs["pred_boxes"]},
        {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"].flip(1)},
    ]
    losses = _criterion(HungarianMatcher(1, 5, 2))(outputs, targets)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0", "cardinality_error_0", "loss_ce_1"} <= set(losses)
    assert "class_error_0" not in losses and "class_error_1" not in losses
    matcher = HungarianMatcher(1, 5, 2)
    for i, aux in enumerate(outputs["aux_outputs"]):
        expected = _expected(aux, targets, [(r.tolist(), c.tolist()) for r, c in matcher(aux, targets)])
        for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert losses[f"{name}_{i}"].item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6)


def test_no_targets_clamps_num_boxes_and_gives_zero_box_losses():
    outputs, _ = _case()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = _criterion(HungarianMatcher())(outputs, [empty, empty])
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    expected = _expected(outputs, [empty, empty], [([], []), ([], [])])
    assert losses["loss_ce"].item() == pytest.approx(expected["loss_ce"], rel=1e-5)
    assert losses["class_error"] == 100


def test_inverted_target_boxes_raise_in_the_loss():
    outputs, targets = _case()
    targets[1]["boxes"][0, 2] = -0.2
    with pytest.raises(ValueError, match="inverted box"):
        _criterion(FixedMatcher(INDICES))(outputs, targets)


def test_mask_losses_focal_and_dice_by_hand():
    outputs, targets = _case()
    outputs["pred_masks"] = torch.randn(2, 3, 4, 5)
    targets[0]["masks"] = torch.rand(2, 8, 10) > 0.5
    targets[1]["masks"] = (torch.rand(1, 6, 9) > 0.3).to(torch.uint8)
    losses = _criterion(FixedMatcher(INDICES), losses=("masks",))(outputs, targets)
    focal = dice = 0.0
    for b, (rows, cols) in enumerate(INDICES):
        for q, t in zip(rows, cols):
            logit = F.interpolate(outputs["pred_masks"][b, q][None, None], size=(8, 10), mode="bilinear")[0, 0]
            target = torch.zeros(8, 10)
            mask = targets[b]["masks"][t].float()
            target[: mask.shape[0], : mask.shape[1]] = mask
            p = logit.sigmoid().double()
            y = target.double()
            ce = -(y * p.log() + (1 - y) * (1 - p).log())
            p_t = p * y + (1 - p) * (1 - y)
            focal += ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).mean().item()
            dice += 1 - (2 * (p * y).sum().item() + 1) / (p.sum().item() + y.sum().item() + 1)
    assert losses["loss_mask"].item() == pytest.approx(focal / 3, rel=1e-4)
    assert losses["loss_dice"].item() == pytest.approx(dice / 3, rel=1e-4)


def test_losses_are_float32_under_autocast():
    outputs, targets = _case()
    low = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion(FixedMatcher(INDICES))(low, targets)
    expected = _criterion(FixedMatcher(INDICES))({k: v.float() for k, v in low.items()}, targets)
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expected[name])


def test_num_boxes_is_averaged_over_processes(tmp_path):
    outputs, targets = _case()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        losses = _criterion(FixedMatcher(INDICES))(outputs, targets)
    finally:
        dist.destroy_process_group()
    assert losses["loss_bbox"].item() == pytest.approx(_expected(outputs, targets, INDICES)["loss_bbox"], rel=1e-5)


def test_attributes_and_unknown_loss():
    criterion = _criterion(HungarianMatcher())
    assert criterion.num_classes == NUM_CLASSES and criterion.eos_coef == EOS
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, EOS])
    with pytest.raises(ValueError, match="unknown losses"):
        _criterion(HungarianMatcher(), losses=("labels", "boxs"))
