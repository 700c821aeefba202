"""--query_groups (Group DETR): independent query groups while training, group 0 alone at inference."""

from __future__ import annotations

import pytest
import torch

import models
from models.criterion import SetCriterion
from models.matcher import HungarianMatcher
from models.transformer import group_attention_bias
from util.misc import nested_tensor_from_tensor_list

GROUP_FLAGS = ("--query_groups", "3", "--dropout", "0", "--dec_layers", "3")


def _images():
    return nested_tensor_from_tensor_list([torch.rand(3, 64, 96), torch.rand(3, 80, 48)])


def test_group_attention_bias_blocks_other_groups():
    bias = group_attention_bias(6, 3, torch.device("cpu"))[0]
    blocked = torch.isinf(bias)
    for i in range(6):
        for j in range(6):
            assert blocked[i, j] == (i // 2 != j // 2)
    assert group_attention_bias(6, 1, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="equal groups"):
        group_attention_bias(7, 3, torch.device("cpu"))


@pytest.mark.parametrize("extra", [(), ("--spatial_prior", "gaussian", "--box_refine")])
def test_group_zero_while_training_equals_inference(tiny_args, extra):
    """Groups do not see each other: group 0's training outputs (no dropout) are exactly the inference outputs,
    while the other groups, with other queries, predict something else."""
    torch.manual_seed(0)
    model, _, _ = models.build_model(tiny_args(*GROUP_FLAGS, *extra))
    assert model.query_embed.weight.shape == (30, 32)
    images = _images()
    with torch.no_grad():
        train_out = model.train()(images)
        eval_out = model.eval()(images)
    assert train_out["query_groups"] == 3 and "query_groups" not in eval_out
    assert train_out["pred_logits"].shape[1] == 30 and eval_out["pred_logits"].shape[1] == 10
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(train_out[key][:, :10], eval_out[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(train_out["aux_outputs"][0][key][:, :10], eval_out["aux_outputs"][0][key])
        assert not torch.allclose(train_out[key][:, 10:20], eval_out[key], atol=1e-3)


def test_grouped_losses_are_the_mean_of_per_group_losses():
    """The criterion on G groups equals the average of the criterion applied to each group alone."""
    torch.manual_seed(0)
    groups, queries, num_classes = 3, 5, 4
    outputs = {"pred_logits": torch.randn(2, groups * queries, num_classes + 1)}
    outputs["pred_boxes"] = torch.rand(2, groups * queries, 4) * 0.5 + 0.2
    outputs["aux_outputs"] = [{k: v + 0.1 for k, v in outputs.items()}]
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    criterion = SetCriterion(num_classes, HungarianMatcher(1, 5, 2), weights, 0.1, ["labels", "boxes"])
    grouped = criterion({**outputs, "query_groups": groups}, targets)

    def group_slice(out, g):
        return {k: v[:, g * queries : (g + 1) * queries] for k, v in out.items() if k != "aux_outputs"}

    per_group = []
    for g in range(groups):
        sliced = {**group_slice(outputs, g), "aux_outputs": [group_slice(outputs["aux_outputs"][0], g)]}
        per_group.append(criterion(sliced, targets))
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        expected = torch.stack([losses[name] for losses in per_group]).mean()
        torch.testing.assert_close(grouped[name], expected, rtol=1e-5, atol=1e-6)


def test_grouped_training_step_and_masks_refused(tiny_args):
    model, criterion, _ = models.build_model(tiny_args(*GROUP_FLAGS))
    losses = criterion(model.train()(_images()), [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])},
    ])  # fmt: skip
    sum(losses[k] * criterion.weight_dict[k] for k in criterion.weight_dict).backward()
    assert model.query_embed.weight.grad[20:].abs().sum() > 0  # the last group learns too
    with pytest.raises(ValueError, match="--query_groups 3 is for detection only"):
        models.build_model(tiny_args(*GROUP_FLAGS, "--masks"))
