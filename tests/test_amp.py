"""util/amp.py: bf16 autocast on CPU, float32 matching and box losses under autocast, GradScaler only for fp16."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILY_FLAGS

import models
from models.matcher import HungarianMatcher
from util.amp import autocast_context, check_amp, make_grad_scaler, optimizer_step
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.misc import nested_tensor_from_tensor_list


def _targets(generator: torch.Generator, counts=(3, 2)) -> list[dict]:
    targets = []
    for n in counts:
        centers = 0.3 + 0.4 * torch.rand(n, 2, generator=generator)
        extents = 0.1 + 0.3 * torch.rand(n, 2, generator=generator)
        labels = torch.randint(1, 5, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centers, extents], 1)})
    return targets


@pytest.fixture(params=["detr", "deformable_detr", "dino"])
def tiny_detr(tiny_args, request):
    args = tiny_args(*FAMILY_FLAGS[request.param], "--num_classes", "5", "--amp", "bf16")
    model, criterion, _ = models.build_model(args)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 80, generator=generator), torch.randn(3, 56, 64, generator=generator)]
    return model, criterion, nested_tensor_from_tensor_list(images), _targets(generator)


def _forward(model, samples, targets):
    """The training forward; DINO also decodes its denoising queries (noise drawn from a fixed seed)."""
    torch.manual_seed(5)
    return model(samples, targets) if getattr(model, "needs_targets", False) else model(samples)


def _float(value):
    """Every tensor in nested outputs (DINO: encoder outputs, denoising outputs) upcast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, dict):
        return {k: _float(v) for k, v in value.items()}
    return [_float(v) for v in value] if isinstance(value, list) else value


def test_bf16_forward_loss_backward_on_cpu(tiny_detr):
    model, criterion, samples, targets = tiny_detr
    with autocast_context("cpu", "bf16"):
        outputs = _forward(model, samples, targets)
        losses = criterion(outputs, targets)
    assert outputs["pred_logits"].dtype == torch.bfloat16  # the heads really ran in bf16
    # Deformable DETR's weight dict also names the two-stage '_enc' losses (published): weigh what was computed.
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # bf16 stays close to the float32 model (same weights): a loose check that autocast did not break it.
    with torch.no_grad():
        again = criterion(_forward(model, samples, targets), targets)
        reference = sum(v * criterion.weight_dict[k] for k, v in again.items() if k in criterion.weight_dict)
    assert abs(loss.item() - reference.item()) < 0.05 * abs(reference.item())


def test_losses_under_autocast_equal_float32_losses_of_the_same_predictions(tiny_detr):
    model, criterion, samples, targets = tiny_detr
    with torch.no_grad(), autocast_context("cpu", "bf16"):
        outputs = _forward(model, samples, targets)
        under_autocast = criterion(outputs, targets)
    assert outputs.get("dn_meta", True) is not None  # DINO: the denoising losses are part of the comparison
    plain = criterion(_float(outputs), targets)
    assert under_autocast.keys() == plain.keys()
    for name, value in under_autocast.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=name)


def test_matcher_costs_are_float32_under_autocast(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 6, 6, generator=generator).bfloat16(),
        "pred_boxes": (0.3 + 0.4 * torch.rand(2, 6, 4, generator=generator)).bfloat16(),
    }
    targets = _targets(generator)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    seen = []
    original = HungarianMatcher._cost

    def spy(self, *args):
        cost = original(self, *args)
        seen.append(cost.dtype)
        return cost

    monkeypatch.setattr(HungarianMatcher, "_cost", spy)
    with autocast_context("cpu", "bf16"):
        indices = matcher(outputs, targets)
    assert seen == [torch.float32]
    # Independent oracle: the float32 cost of the upcast predictions, solved per image by brute force.
    for b, (rows, cols) in enumerate(indices):
        prob = outputs["pred_logits"][b].float().softmax(-1)
        boxes = outputs["pred_boxes"][b].float()
        tgt = targets[b]["boxes"]
        cost = (
            5 * (boxes[:, None] - tgt[None]).abs().sum(-1)
            - prob[:, targets[b]["labels"]]
            - 2 * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))
        )
        best = min(
            (cost[list(perm), range(len(tgt))].sum().item(), perm)
            for perm in itertools.permutations(range(boxes.shape[0]), len(tgt))
        )
        assert cost[rows, cols].sum().item() == pytest.approx(best[0], abs=1e-5)


def test_box_losses_are_float32_and_equal_a_float64_oracle():
    generator = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    criterion = models.detr.SetCriterion(5, matcher, {"loss_bbox": 5}, eos_coef=0.1, losses=["boxes"])
    boxes = (0.3 + 0.4 * torch.rand(1, 4, 4, generator=generator)).bfloat16()
    outputs = {"pred_logits": torch.randn(1, 4, 6).bfloat16(), "pred_boxes": boxes}
    targets = _targets(generator, counts=(2,))
    with autocast_context("cpu", "bf16"):
        losses = criterion(outputs, targets)
    (rows, cols) = matcher({k: v.float() for k, v in outputs.items()}, targets)[0]
    src = boxes[0, rows].double()
    tgt = targets[0]["boxes"][cols].double()
    assert losses["loss_bbox"].dtype == torch.float32 and losses["loss_giou"].dtype == torch.float32
    expected_l1 = F.l1_loss(src, tgt, reduction="sum") / 2
    giou = generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)).diagonal()
    assert losses["loss_bbox"].item() == pytest.approx(expected_l1.item(), rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx((1 - giou).sum().item() / 2, rel=1e-6)


def test_autocast_context_modes():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", "off"):
        assert (a @ b).dtype == torch.float32
    with autocast_context("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="expected one of"):
        check_amp("fp32", "cpu")


def test_grad_scaler_is_enabled_only_for_fp16():
    assert not make_grad_scaler("off", "cpu").is_enabled()
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("bf16", "cuda").is_enabled()
    with pytest.raises(ValueError, match="--amp fp16"):
        make_grad_scaler("fp16", "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grad_scaler_enabled_for_fp16_on_cuda():
    scaler = make_grad_scaler("fp16", "cuda")
    assert scaler.is_enabled() and "scale" in scaler.state_dict()


def _model_and_loss():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 4)
    return model, lambda m: (m(x) ** 2).mean()


def test_optimizer_step_with_disabled_scaler_is_plain_backward_clip_step():
    model, loss_fn = _model_and_loss()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=0.1)
    norm = optimizer_step(loss_fn(model), opt, make_grad_scaler("off", "cpu"), max_norm=0.1)
    loss_fn(twin).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    opt_twin.step()
    assert norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_optimizer_step_with_enabled_scaler_unscales_and_skips_overflow():
    # An enabled CPU scaler stands in for fp16 on CUDA: the update must equal the unscaled one.
    model, loss_fn = _model_and_loss()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    norm = optimizer_step(loss_fn(model), opt, scaler, max_norm=0)
    norm_twin = optimizer_step(loss_fn(twin), opt_twin, make_grad_scaler("off", "cpu"), max_norm=0)
    assert norm.item() == pytest.approx(norm_twin.item(), rel=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    norm = optimizer_step(loss_fn(model) * float("inf"), opt, scaler, max_norm=0)
    assert not torch.isfinite(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # step skipped
    assert scaler.get_scale() == 2.0**9  # and the scale backed off
