"""Non-finite losses: --skip_nonfinite skips exactly the bad batches (one warning each); fp16 overflows are counted.

The default stop (no checkpoint written, the last one untouched) is tested end to end in test_main_e2e.py.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import models
from engine import NonFiniteLossError, train_one_epoch
from util.misc import nested_tensor_from_tensor_list

CPU = torch.device("cpu")


def _batches(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n):
        images = [torch.randn(3, 64, 64, generator=g) for _ in range(2)]
        targets = tuple(
            {"labels": torch.tensor([1 + (b + i) % 4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]),
             "image_id": torch.tensor(2 * b + i), "orig_size": torch.tensor([64, 64]), "size": torch.tensor([64, 64])}
            for i in range(2)
        )  # fmt: skip
        batches.append((nested_tensor_from_tensor_list(images), targets))
    return batches


class _PoisonAt:
    """Criterion whose 'loss_bbox' is NaN (or inf) on the given calls, like a diverging batch."""

    def __init__(self, criterion, bad_calls, value=float("nan")):
        self.criterion, self.bad_calls, self.value, self.calls = criterion, set(bad_calls), value, 0
        self.weight_dict = criterion.weight_dict

    def train(self, mode=True):
        return self.criterion.train(mode)

    def __call__(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if self.calls in self.bad_calls:
            losses["loss_bbox"] = losses["loss_bbox"] + self.value
        self.calls += 1
        return losses


@pytest.fixture
def tiny(tiny_args):
    model, criterion, _ = models.build_model(tiny_args("--num_classes", "5", "--lr_backbone", "0"))
    return model, criterion


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def test_skipped_batches_leave_no_trace_and_warn_once_each(tiny, caplog):
    model, criterion = tiny
    twin = copy.deepcopy(model)
    batches = _batches(4)
    with caplog.at_level(logging.WARNING, logger="detr"):
        stats = train_one_epoch(model, _PoisonAt(criterion, {0, 2}, float("inf")), batches, _optimizer(model), CPU, 0,
                                progress=False, skip_nonfinite=2)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "skipping this batch" in r.getMessage()]
    assert len(warnings) == 2
    assert "iteration 0" in warnings[0] and "(1 of --skip_nonfinite 2)" in warnings[0]
    assert "iteration 2" in warnings[1] and "(2 of --skip_nonfinite 2)" in warnings[1]
    assert "loss_bbox=inf" in warnings[0]
    # Independent check: training only on the good batches gives the same weights and the same mean loss.
    twin_stats = train_one_epoch(twin, criterion, [batches[1], batches[3]], _optimizer(twin), CPU, 0, progress=False)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert stats["loss"] == twin_stats["loss"]


def test_one_more_bad_batch_than_allowed_stops(tiny):
    model, criterion = tiny
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 \(loss_bbox=nan\)"):
        train_one_epoch(model, _PoisonAt(criterion, {0, 2}), _batches(3), _optimizer(model), CPU, 0,
                        progress=False, skip_nonfinite=1)  # fmt: skip


def test_fp16_overflow_steps_are_counted_not_fatal(tiny):
    # An enabled CPU GradScaler stands in for fp16 on CUDA: a scale of 2**127 overflows the scaled gradients.
    model, criterion = tiny
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    stats = train_one_epoch(model, criterion, _batches(2), _optimizer(model), CPU, 0, progress=False, scaler=scaler)
    assert stats["amp_overflow_steps"] == 2
    assert scaler.get_scale() == 2.0**125  # backed off once per overflow
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # both steps were skipped


class _DivergeAt(torch.nn.Module):
    """Model wrapper whose predicted boxes are NaN on the given calls (a diverged model: --lr 1e12)."""

    def __init__(self, model, bad_calls):
        super().__init__()
        self.model, self.bad_calls, self.calls = model, set(bad_calls), 0

    def forward(self, samples):
        outputs = self.model(samples)
        if self.calls in self.bad_calls:
            outputs["pred_boxes"] = outputs["pred_boxes"] * float("nan")
        self.calls += 1
        return outputs


def test_nonfinite_predictions_are_skipped_like_a_nonfinite_loss(tiny, caplog):
    """Issue 15: NaN predictions ended in the matcher's ValueError; --skip_nonfinite must cover them."""
    model, criterion = tiny
    batches = _batches(3)
    with caplog.at_level(logging.WARNING, logger="detr"):
        stats = train_one_epoch(_DivergeAt(model, {1}), criterion, batches, _optimizer(model), CPU, 0,
                                progress=False, skip_nonfinite=1)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "skipping this batch" in r.getMessage()]
    assert len(warnings) == 1 and "non-finite predictions" in warnings[0] and "iteration 1" in warnings[0]
    assert "pred_boxes" in warnings[0] and torch.isfinite(torch.tensor(stats["loss"]))


def test_nonfinite_predictions_stop_training_with_the_nonfinite_error(tiny):
    model, criterion = tiny
    with pytest.raises(NonFiniteLossError, match=r"non-finite predictions at epoch 0, iteration 0 \(pred_boxes"):
        train_one_epoch(_DivergeAt(model, {0}), criterion, _batches(2), _optimizer(model), CPU, 0, progress=False)
