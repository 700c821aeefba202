"""DETR model and build(): forward on padded batches, gradient flow, heads, build wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import parse_tiny_args

from models import build_model
from models.attention import set_attention_kernel
from models.criterion import SetCriterion
from models.detr import DETR, MLP, PostProcess
from models.detr import SetCriterion as SetCriterionFromDetr
from util.misc import nested_tensor_from_tensor_list


def _images():
    return [torch.randn(3, 64, 80), torch.randn(3, 48, 64)]


def _targets():
    return [
        {"labels": torch.tensor([1, 7]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]])},
    ]


@torch.no_grad()
def test_forward_on_two_images_of_different_sizes():
    model, _, _ = build_model(parse_tiny_args("--num_classes", "9"))
    model.eval()
    images = _images()
    out = model(images)
    assert out["pred_logits"].shape == (2, 10, 10) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    nested = model(nested_tensor_from_tensor_list(images))
    torch.testing.assert_close(nested["pred_logits"], out["pred_logits"])
    set_attention_kernel(model, "math")
    reference = model(images)
    torch.testing.assert_close(reference["pred_boxes"], out["pred_boxes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference["pred_logits"], out["pred_logits"], atol=1e-5, rtol=1e-5)


def test_no_aux_loss_and_plain_tensor_input():
    model, criterion, _ = build_model(parse_tiny_args("--no_aux_loss"))
    out = model(torch.randn(2, 3, 32, 32))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert set(criterion(out, _targets())) == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}


@pytest.mark.parametrize("lr_backbone", ["1e-5", "0"])
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(lr_backbone):
    model, criterion, _ = build_model(parse_tiny_args("--lr_backbone", lr_backbone, "--position_embedding", "learned"))
    losses = criterion(model(_images()), _targets())
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    frozen_prefixes = ("backbone.0.body.conv1.", "backbone.0.body.layer1.")
    for name, param in model.named_parameters():
        backbone_trainable = lr_backbone != "0" and not name.startswith(frozen_prefixes)
        should_train = not name.startswith("backbone.0.") or backbone_trainable
        assert param.requires_grad == should_train, name
        if should_train:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() > 0]
    assert "backbone.1.row_embed.weight" in trained and "query_embed.weight" in trained
    assert any(n.startswith("backbone.0.body.layer4.") for n in trained) == (lr_backbone != "0")


def test_mlp_is_linear_relu_stack():
    mlp = MLP(6, 5, 4, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(5, 6), (5, 5), (4, 5)]
    x = torch.randn(2, 6)
    expected = mlp.layers[2](F.relu(mlp.layers[1](F.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)


def test_build_wiring():
    args = parse_tiny_args("--set_cost_bbox", "3", "--bbox_loss_coef", "4", "--eos_coef", "0.2", "--dec_layers", "3")
    model, criterion, postprocessors = build_model(args)
    assert isinstance(model, DETR) and model.num_queries == 10 and model.aux_loss
    assert isinstance(criterion, SetCriterion) and SetCriterionFromDetr is SetCriterion
    assert criterion.matcher.cost_bbox == 3 and criterion.eos_coef == 0.2 and criterion.num_classes == 91
    assert criterion.losses == ["labels", "boxes", "cardinality"]
    expected = {"loss_ce": 1, "loss_bbox": 4, "loss_giou": 2}
    for i in range(2):
        expected.update({f"loss_ce_{i}": 1, f"loss_bbox_{i}": 4, f"loss_giou_{i}": 2})
    assert criterion.weight_dict == expected
    assert set(postprocessors) == {"bbox"} and isinstance(postprocessors["bbox"], PostProcess)
    assert model.class_embed.out_features == 92


def test_num_classes_rule():
    def classes(*flags: str, num_classes: int | None = None) -> int:
        return build_model(parse_tiny_args(*flags), num_classes)[0].class_embed.out_features - 1

    assert classes() == 91
    assert classes("--dataset_file", "synthetic") == 91
    assert classes("--dataset_file", "coco_panoptic") == 250
    assert classes("--dataset_file", "coco_panoptic", "--num_classes", "5") == 5
    assert classes("--num_classes", "5", num_classes=7) == 7  # the caller's (inferred) count wins


def test_frozen_weights_require_masks():
    with pytest.raises(ValueError, match="--masks"):
        build_model(parse_tiny_args("--frozen_weights", "x.pth"))


def test_masks_build_wraps_segmentation_model():
    segmentation = pytest.importorskip("models.detr.segmentation")
    args = parse_tiny_args("--masks", "--dataset_file", "coco_panoptic")
    model, criterion, postprocessors = build_model(args)
    assert isinstance(model, segmentation.DETRsegm) and isinstance(model.detr, DETR)
    assert criterion.num_classes == 250 and "masks" in criterion.losses
    assert {"loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"} <= set(criterion.weight_dict)
    assert set(postprocessors) == {"bbox", "segm", "panoptic"}
    assert isinstance(postprocessors["panoptic"], segmentation.PostProcessPanoptic)
    assert isinstance(postprocessors["segm"], segmentation.PostProcessSegm)
