"""Mixed precision for ``--amp {off,bf16,fp16}``: one autocast context and one (maybe disabled) GradScaler.

bf16 runs on CPU and CUDA and needs no loss scaling (it has float32's exponent range). fp16 is CUDA-only here
and always goes with a GradScaler, whose state belongs in checkpoints under 'scaler'. The matcher, the box
losses and GIoU disable autocast and compute in float32 themselves (models/matcher.py, models/criterion.py):
their costs and IoUs lose ranks and gradients in half precision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["AMP_DTYPES", "AMP_MODES", "autocast_context", "check_amp", "make_grad_scaler", "optimizer_step"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = ("off", *AMP_DTYPES)


def check_amp(amp: str, device_type: str) -> None:
    """Raise a one-line ValueError when ``--amp amp`` cannot run on ``device_type`` ('cpu', 'cuda', ...)."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp {amp!r}: expected one of {AMP_MODES}")
    if amp == "fp16" and device_type == "cpu":
        raise ValueError("--amp fp16 needs a CUDA device (loss scaling); on CPU use --amp bf16 or --amp off")


def autocast_context(device_type: str, amp: str = "off") -> contextlib.AbstractContextManager:
    """The context to run the model forward (and the criterion) in.

    Args:
        device_type: ``torch.device(...).type`` of the model ('cpu', 'cuda', 'mps').
        amp: 'off' (a no-op context), 'bf16' or 'fp16'.

    Returns:
        ``torch.autocast(device_type, dtype)`` or ``contextlib.nullcontext()`` for 'off'.
    """
    check_amp(amp, device_type)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AMP_DTYPES[amp])


def make_grad_scaler(amp: str, device_type: str) -> torch.amp.GradScaler:
    """A GradScaler enabled only for fp16 (a disabled one passes losses and steps through unchanged).

    Always returning a scaler keeps a single training code path; ``scaler.is_enabled()`` tells whether its
    ``state_dict()`` is worth saving.
    """
    check_amp(amp, device_type)
    return torch.amp.GradScaler(device_type, enabled=amp == "fp16")


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    max_norm: float = 0.0,
    params: Iterable[Tensor] | None = None,
) -> Tensor:
    """Backward, (unscale,) clip, step and scaler update; gradients are cleared first.

    Args:
        loss: scalar loss to minimise.
        optimizer: its parameters receive the gradients.
        scaler: from ``make_grad_scaler``; disabled means plain float32 gradients.
        max_norm: gradient clipping norm (0 clips nothing; the norm is still computed).
        params: parameters to clip (default: every parameter of ``optimizer``).

    Returns:
        The total gradient norm before clipping, in true (unscaled) units; inf/nan when fp16 overflowed,
        in which case the scaler skips the step and lowers its scale.
    """
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clipping must see true gradient magnitudes
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    return grad_norm
