"""Run outputs for humans and tools: console messages, running means, log.txt JSON lines, TensorBoard.

Only the main process writes; the other processes get a RunLogger whose writes do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from util import distributed as dist_utils

LOGGER_NAME = "detr"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (so redirections made later are honoured)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console(is_main: bool) -> logging.Logger:
    """Plain ``message`` lines on stdout from the main process; other processes print warnings only."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    return logger


class MetricTracker:
    """Running means (and plain totals) of named scalars; ``synchronize`` merges those of every process."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.totals: dict[str, float] = defaultdict(float)

    def update(self, n: int = 1, **values: float | torch.Tensor) -> None:
        """Add each value ``n`` times (e.g. a batch mean with n = batch size)."""
        for name, value in values.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            self.sums[name] += value * n
            self.counts[name] += n

    def add(self, name: str, amount: float = 1.0) -> None:
        """Count events (reported as a total, not a mean)."""
        self.totals[name] += amount

    def synchronize(self) -> None:
        """Sum the statistics over processes (every process must call it with the same names)."""
        if dist_utils.get_world_size() == 1:
            return
        names = sorted(self.sums)
        local = [[self.sums[k], self.counts[k]] for k in names] + [[v, 0] for v in self.totals.values()]
        merged = dist_utils.all_reduce_sum(torch.tensor(local, dtype=torch.float64).reshape(-1, 2)).tolist()
        for name, (total, count) in zip(names, merged):
            self.sums[name], self.counts[name] = total, int(count)
        for name, (total, _) in zip(list(self.totals), merged[len(names) :]):
            self.totals[name] = total

    def means(self) -> dict[str, float]:
        """Means of the ``update`` values plus the ``add`` totals."""
        return {**{k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}, **self.totals}


class RunLogger:
    """Writes ``log.txt`` (one JSON line per epoch) and TensorBoard scalars under ``output_dir``.

    Args:
        output_dir: run folder; None or '' writes nothing (the published behaviour without --output_dir).
        enabled: False on every process but the main one.
        tensorboard: also write TensorBoard event files under ``output_dir/tensorboard``.
    """

    def __init__(self, output_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir) if output_dir and enabled else None
        self._tensorboard = tensorboard
        self._writer = None

    @property
    def log_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / "log.txt"

    @property
    def tensorboard_dir(self) -> Path | None:
        return None if self.output_dir is None or not self._tensorboard else self.output_dir / "tensorboard"

    def _tb(self):
        if self._writer is None and self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: only runs that log need it

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        return self._writer

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Write finite numeric ``values`` as TensorBoard scalars ``prefix + name`` at ``step``."""
        writer = self._tb()
        if writer is None:
            return
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(prefix + name, value, step)

    def log_epoch(self, stats: Mapping[str, Any]) -> None:
        """Append one JSON line to log.txt (the published format) and flush TensorBoard."""
        if self.log_path is None:
            return
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(dict(stats)) + "\n")
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of a log.txt as dicts."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
