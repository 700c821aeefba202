"""util.box_ops against hand-computed values (conversions, IoU, GIoU incl. degenerate boxes, masks_to_boxes)."""

from __future__ import annotations

import pytest
import torch

from util.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    check_boxes_xyxy,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    masks_to_boxes,
)


def test_conversions_hand_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.2]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.8, 0.1, 1.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), expected)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected), cxcywh)
    random = torch.rand(3, 5, 4)  # batched leading dims round-trip too
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(random)), random)


def test_box_iou_returns_iou_and_union():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(a, b)
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))


def test_generalized_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    # overlap: iou 1/7, enclosing 3x3 = 9, union 7; disjoint: enclosing 3x2 = 6, union 4+1 = 5; identical: 1
    expected = torch.tensor(
        [
            [1 / 7 - 2 / 9, 0 - (6 - 5) / 6, 1.0],
            [0 - (9 - 5) / 9, 0 - (3 - 2) / 3, 1 / 4],
        ]
    )
    torch.testing.assert_close(generalized_box_iou(a, b), expected)
    # batched [..., N, 4] form equals the per-batch results
    torch.testing.assert_close(generalized_box_iou(a[None].repeat(2, 1, 1), b[None].repeat(2, 1, 1))[1], expected)
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b[:2]), torch.diagonal(expected[:, :2]))


def test_giou_zero_width_boxes_are_finite_with_finite_gradients():
    a = torch.tensor([[1.0, 1.0, 1.0, 3.0], [1.0, 1.0, 1.0, 3.0], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 3.0], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    pairwise = generalized_box_iou(a, b)
    elementwise = elementwise_generalized_box_iou(a, b)
    # zero-width vs 2x2: intersection 0, union 4, enclosing (0,0)-(2,3) = 6 -> -(6 - 4) / 6
    torch.testing.assert_close(pairwise[0, 0], torch.tensor(-1 / 3))
    torch.testing.assert_close(elementwise[0], torch.tensor(-1 / 3))
    assert torch.isfinite(pairwise).all() and torch.isfinite(elementwise).all()
    (pairwise.sum() + elementwise.sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_inverted_boxes_raise_clear_error():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    check_boxes_xyxy(good, "boxes")
    with pytest.raises(ValueError, match="inverted box"):
        check_boxes_xyxy(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.4, 1.0]]), "target boxes")
    with pytest.raises(ValueError, match="NaN"):
        check_boxes_xyxy(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), "target boxes")


def test_masks_to_boxes_hand_values():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    masks[1, 5, 0] = True
    boxes = masks_to_boxes(masks)
    torch.testing.assert_close(boxes, torch.tensor([[2.0, 1.0, 6.0, 3.0], [0.0, 5.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))
    assert masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)


def test_masks_to_boxes_accepts_uint8_masks():
    masks = torch.zeros(2, 6, 8, dtype=torch.uint8)
    masks[0, 1:4, 2:7] = 1
    torch.testing.assert_close(masks_to_boxes(masks), torch.tensor([[2.0, 1.0, 6.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))
