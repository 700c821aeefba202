"""What a run learns while it runs, kept apart from the parsed flags (which are never written to after parsing)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from run.distributed import DistributedState

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """Run state of one process.

    Attributes:
        device: the device the run uses (``--device`` resolved: a missing default CUDA falls back).
        dist: this process's place among the run's processes.
        argv: the command line as given (for the exact command that resumes the run), None from Python.
        start_time: wall-clock origin of 'elapsed_time' in log.txt (set-up included).
        num_classes: the classifier size (``--num_classes``, else inferred from the annotations).
    """

    device: torch.device
    dist: DistributedState = field(default_factory=DistributedState)
    argv: list[str] | None = None
    start_time: float = field(default_factory=time.time)
    num_classes: int | None = None

    def record(self, args: argparse.Namespace) -> argparse.Namespace:
        """The flags as this run resolved them, for checkpoints and config files: ``args`` with the device, the
        process count and the class count it used (a new Namespace; ``args`` is left as parsed)."""
        resolved: dict[str, Any] = {**vars(args), "device": str(self.device), "world_size": self.dist.world_size}
        if self.num_classes is not None:
            resolved["num_classes"] = self.num_classes
        return argparse.Namespace(**resolved)
