"""Linear learning-rate warm-up per optimizer step (RT-DETRv2's published solver).

Step ``s`` (0 at construction, +1 after every optimizer step) sets each param group's lr to
``base * min(1, (s + 1) / warmup_iters)``, ``base`` being that group's lr when the warm-up was built, so the
very first optimizer step already runs at ``base / warmup_iters``. Once ``s`` reaches ``warmup_iters`` the
warm-up is :attr:`~LinearWarmup.finished` and never touches the lr again: the epoch scheduler takes over
and is stepped only from then on (:func:`step_epoch_scheduler`).

Build it after the epoch scheduler (which records the groups' base lr as ``initial_lr``), e.g.::

    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1000], 0.1)
    warmup = LinearWarmup(optimizer, warmup_iters=2000)
    for epoch ...:
        for batch ...:
            ...; optimizer.step(); warmup.step()
        step_epoch_scheduler(lr_scheduler, warmup)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class LinearWarmup:
    """Linear warm-up of every param group's lr over ``warmup_iters`` optimizer steps.

    Args:
        optimizer: its groups' current lr values are the targets reached at the end of the warm-up.
        warmup_iters: number of warm-up steps; 0 means no warm-up (finished at construction, lr untouched).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_iters: int):
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.optimizer = optimizer
        self.warmup_iters = int(warmup_iters)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The lr multiplier at warm-up step ``step``: ``min(1, (step + 1) / warmup_iters)``."""
        return min(1.0, (step + 1) / self.warmup_iters)

    @property
    def finished(self) -> bool:
        """True once the warm-up no longer sets the lr (``step_count >= warmup_iters``)."""
        return self.step_count >= self.warmup_iters

    def _apply(self) -> None:
        if self.finished:
            return
        factor = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        """Advance one optimizer step (call after every ``optimizer.step()``)."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """``{'warmup_iters', 'step_count', 'base_lrs'}`` for exact resume."""
        return {"warmup_iters": self.warmup_iters, "step_count": self.step_count, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; while still warming up the groups' lr is set again."""
        base_lrs = [float(lr) for lr in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"warm-up state has {len(base_lrs)} param groups but the optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        self.warmup_iters = int(state["warmup_iters"])
        self.step_count = int(state["step_count"])
        self.base_lrs = base_lrs
        self._apply()


def step_epoch_scheduler(lr_scheduler: Any, warmup: LinearWarmup | None) -> None:
    """End-of-epoch step of the epoch scheduler, skipped while the warm-up is still running (as published)."""
    if warmup is None or warmup.finished:
        lr_scheduler.step()
