"""Opt-in speed-ups that keep parameter names: channels_last memory format and torch.compile of submodules.

Both act in place on the given modules, so state-dict keys (and published checkpoints) are unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CompileReport", "apply_channels_last", "compile_model"]

log = logging.getLogger("detr")

COMPILED_SUBMODULES = ("backbone", "transformer")


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer (conv weights) of ``model`` as channels_last (NHWC), in place.

    Convolutions whose weight is channels_last produce channels_last outputs, so the backbone runs NHWC from
    its first layer without converting the [B, 3, H, W] input; 1-D/2-D tensors (Linear, norms) are untouched.

    Returns:
        ``model`` itself.
    """
    return model.to(memory_format=torch.channels_last)


@dataclass
class CompileReport:
    """What ``compile_model`` did.

    Attributes:
        modules: names of the compiled submodules.
        first_forward_s: wall time of the first forward after compiling (mostly graph capture and code
            generation of the forward; the backward compiles during the first backward), None before it runs.
    """

    modules: list[str] = field(default_factory=list)
    first_forward_s: float | None = None


def compile_model(
    model: nn.Module, dynamic: bool | None = False, mode: str | None = None, backend: str = "inductor"
) -> CompileReport:
    """torch.compile the ``backbone`` and ``transformer`` submodules of a DETR model in place.

    The heads, the matcher and the loss stay eager: they are cheap, and the matcher calls scipy.

    ``dynamic=False`` specialises the graphs to each input shape. Variable image sizes would then recompile
    (and after ``torch._dynamo.config.recompile_limit`` shapes, fall back to eager): pad batches with
    ``--size_divisibility`` (e.g. 32 or 128) to bucket shapes, or pass ``dynamic=None`` to let dynamo switch
    to symbolic shapes after the first recompile.

    Args:
        model: DETR or DETRsegm (both expose ``backbone`` and ``transformer``), before DDP wrapping.
        dynamic: forwarded to ``torch.compile``.
        mode: forwarded to ``torch.compile`` (None, 'reduce-overhead', 'max-autotune', ...).
        backend: forwarded to ``torch.compile``; 'eager' traces without code generation (fast tests).

    Returns:
        A CompileReport whose ``first_forward_s`` is filled (and logged) by the first forward call.
    """
    names = [name for name in COMPILED_SUBMODULES if isinstance(getattr(model, name, None), nn.Module)]
    if not names:
        raise ValueError(f"--compile: {type(model).__name__} has none of the submodules {COMPILED_SUBMODULES}")
    for name in names:
        # In place (nn.Module.compile): parameter names stay, unlike torch.compile(module)'s "_orig_mod." prefix.
        getattr(model, name).compile(dynamic=dynamic, mode=mode, backend=backend)
    report = CompileReport(modules=names)
    _time_first_forward(model, report)
    return report


def _time_first_forward(model: nn.Module, report: CompileReport) -> None:
    """Hooks on the (eager) top-level module that time its first forward once, then remove themselves."""
    start: list[float] = []

    def before(module: nn.Module, args: tuple) -> None:
        start.append(time.perf_counter())

    def after(module: nn.Module, args: tuple, output: object) -> None:
        report.first_forward_s = time.perf_counter() - start[0]
        pre_handle.remove()
        post_handle.remove()
        log.info(
            "torch.compile: first forward took %.1f s (compiling %s; later shapes recompile)",
            report.first_forward_s,
            ", ".join(report.modules),
        )

    pre_handle = model.register_forward_pre_hook(before)
    post_handle = model.register_forward_hook(after)
