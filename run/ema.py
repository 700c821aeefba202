"""Exponential moving average of a model's whole state dict (RT-DETRv2's published solver).

After every optimizer step each floating state-dict entry (parameters and float buffers such as BatchNorm
running statistics) moves towards the model's: ``v = d * v + (1 - d) * w`` with the ramped decay
``d = decay * (1 - exp(-updates / warmups))``, so the first updates follow the model almost exactly.
Integer entries (``num_batches_tracked``) are copied. The average is evaluated and checkpointed as
``{'module': state_dict, 'updates': int}`` (the published ``ema`` entry).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / DataParallel (``.module``) and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """EMA copy of a model, updated after each optimizer step.

    Args:
        model: the trained model (DDP-wrapped or compiled models are unwrapped); the EMA copy lives on the
            same device and in eval mode, without gradients.
        decay: asymptotic decay d (published 0.9999), in [0, 1).
        warmups: ramp length in updates (published 2000); the decay at update n is
            ``decay * (1 - exp(-n / warmups))``.

    Attributes:
        module: the averaged model (evaluate it; it is never trained).
        updates: number of :meth:`update` calls so far (restored by :meth:`load_state_dict`).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmups <= 0:
            raise ValueError(f"EMA warmups must be a positive number of updates, got {warmups}")
        self.decay = float(decay)
        self.warmups = warmups
        self.updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay used by update number ``updates`` (1 for the first update)."""
        return self.decay * (1.0 - math.exp(-updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current state dict into the EMA (call after ``optimizer.step()``)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        source = unwrap_model(model).state_dict()
        target = self.module.state_dict()
        if source.keys() != target.keys():
            missing = sorted(set(target) ^ set(source))
            raise KeyError(f"EMA and model state dicts differ (first differing key: {missing[0]})")
        averaged, current = [], []
        for key, value in target.items():
            weight = source[key].detach()
            if value.dtype.is_floating_point:
                averaged.append(value)
                current.append(weight.to(device=value.device, dtype=value.dtype))
            else:
                value.copy_(weight)
        if averaged:
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, current, alpha=1.0 - d)

    def to(self, device: torch.device | str) -> ModelEMA:
        """Move the EMA copy to ``device`` (returns self)."""
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{'module': EMA state dict, 'updates': int}``, the published checkpoint entry ``ema``."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` output (the published ``ema`` entry); 'updates' defaults to 0."""
        if "module" not in state:
            raise KeyError(f"EMA state has no 'module' entry (keys: {sorted(state)})")
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = int(state.get("updates", 0))


def build_ema(model: nn.Module, decay: float, warmups: int) -> ModelEMA | None:
    """A :class:`ModelEMA` of ``model``, or None when ``decay`` is 0 (--ema_decay 0 turns the EMA off)."""
    if decay == 0:
        return None
    return ModelEMA(model, decay=decay, warmups=warmups)
