"""LinearWarmup: hand values of the published schedule, per-group base lrs, exact resume, epoch scheduler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from run.lr_warmup import LinearWarmup, step_epoch_scheduler


def _optimizer(lr: float = 1e-4, lr_backbone: float = 1e-5) -> torch.optim.Optimizer:
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    return torch.optim.AdamW([{"params": a.parameters(), "lr": lr_backbone}, {"params": b.parameters()}], lr=lr)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_schedule_hand_values():
    optimizer = _optimizer()
    warmup = LinearWarmup(optimizer, warmup_iters=2000)
    # lr used by optimizer step number s (0-based) = base * min(1, (s + 1) / 2000)
    expected = {0: 1 / 2000, 1: 2 / 2000, 1999: 1.0, 2000: 1.0, 5000: 1.0}
    for step in range(5001):
        if step in expected:
            assert _lrs(optimizer) == pytest.approx([1e-5 * expected[step], 1e-4 * expected[step]], rel=1e-12), step
        optimizer.step()
        warmup.step()
    assert warmup.finished


def test_finished_leaves_lr_to_others():
    optimizer = _optimizer()
    warmup = LinearWarmup(optimizer, warmup_iters=3)
    for _ in range(3):
        assert not warmup.finished
        warmup.step()
    assert warmup.finished and _lrs(optimizer) == pytest.approx([1e-5, 1e-4])
    optimizer.param_groups[1]["lr"] = 7.0  # e.g. an epoch scheduler's drop
    warmup.step()
    assert optimizer.param_groups[1]["lr"] == 7.0


def test_zero_iters_is_off():
    optimizer = _optimizer()
    warmup = LinearWarmup(optimizer, warmup_iters=0)
    assert warmup.finished and _lrs(optimizer) == [1e-5, 1e-4]
    with pytest.raises(ValueError, match="warmup_iters"):
        LinearWarmup(optimizer, warmup_iters=-1)


def test_resume_mid_warmup():
    optimizer = _optimizer()
    warmup = LinearWarmup(optimizer, warmup_iters=10)
    for _ in range(4):
        warmup.step()
    state, optimizer_state = warmup.state_dict(), optimizer.state_dict()
    uninterrupted = []
    for _ in range(8):
        warmup.step()
        uninterrupted.append(_lrs(optimizer))

    resumed_optimizer = _optimizer()
    resumed = LinearWarmup(resumed_optimizer, warmup_iters=10)  # a fresh run sets step 0's lr ...
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed.load_state_dict(state)  # ... and the resume restores step 4's
    assert _lrs(resumed_optimizer) == pytest.approx([1e-5 * 5 / 10, 1e-4 * 5 / 10])
    replay = []
    for _ in range(8):
        resumed.step()
        replay.append(_lrs(resumed_optimizer))
    assert replay == uninterrupted
    with pytest.raises(ValueError, match="param groups"):
        LinearWarmup(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1), 5).load_state_dict(state)


def test_composes_with_epoch_multistep():
    """Warm-up 5 steps, 2 steps per epoch, MultiStepLR([1], 0.1) stepped only once the warm-up has finished."""
    optimizer = _optimizer(lr=1.0, lr_backbone=0.5)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)
    warmup = LinearWarmup(optimizer, warmup_iters=5)
    seen = []
    for _epoch in range(5):
        for _ in range(2):
            seen.append(optimizer.param_groups[1]["lr"])
            optimizer.step()
            warmup.step()
        step_epoch_scheduler(lr_scheduler, warmup)
    # steps 0..4 ramp 1/5..5/5; epoch 2 ends with the warm-up finished: the scheduler's first step is its
    # epoch 1 = the milestone, so the drop lands from step 6 on.
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    # The published MultiStepLR([1000]) never fires: the lr stays at base after the warm-up.
    optimizer = _optimizer()
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1000], gamma=0.1)
    warmup = LinearWarmup(optimizer, warmup_iters=2)
    for _ in range(4):
        optimizer.step()
        warmup.step()
        step_epoch_scheduler(lr_scheduler, warmup)
    assert _lrs(optimizer) == pytest.approx([1e-5, 1e-4])
