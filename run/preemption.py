"""Preemption: turn SIGTERM / SIGUSR1 into a flag the training loop checks at iteration boundaries.

The signal handler only records the request; saving happens in the loop (never inside a handler, where
a half-written optimizer step or a collective could be interrupted). On SLURM, ask for the warning signal
with ``#SBATCH --signal=USR1@120`` and call `requeue_slurm_job` after the checkpoint is saved; the requeued
job continues with ``--resume auto``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class PreemptionHandler:
    """Installs handlers that set ``requested``; restores the previous handlers on exit.

    Usage::

        with PreemptionHandler() as preemption:
            for batch in loader:
                ...
                if preemption.requested:  # (or preemption.requested_on_any_rank(device) under DDP)
                    save_checkpoint(...); break

    Attributes:
        requested: True once one of the signals arrived.
        signal_name: name of the last signal received (e.g. 'SIGUSR1'), or None.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only; elsewhere this logs a warning and does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption: not in the main thread, SIGTERM/SIGUSR1 will not trigger a checkpoint")
            return self
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def forward_to_previous(self, signum: int | None = None) -> bool:
        """Restore the previous handlers and re-deliver a signal to the previous Python handler.

        Under submitit, call this after the checkpoint is saved: submitit's own SIGUSR1 handler then
        requeues the job (and exits). Nothing happens, and False is returned, when the previous handler
        was the default or SIG_IGN (re-sending would kill the process instead of exiting cleanly).

        Args:
            signum: the signal to forward (default: the one received).
        """
        if signum is None:
            if self.signal_name is None:
                return False
            signum = signal.Signals[self.signal_name]
        previous = self._previous.get(signal.Signals(signum))
        self.restore()
        if not callable(previous):
            return False
        os.kill(os.getpid(), signum)
        return True

    def requested_on_any_rank(self, device: Any = "cpu") -> bool:
        """True when any process got a signal (one all-reduce; all ranks must call it at the same step).

        Without an initialised process group this is just ``requested``. ``device`` must suit the backend
        (the CUDA device for nccl).
        """
        import torch  # lazy: keeps this module importable (and testable in a subprocess) without torch

        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def slurm_job_id() -> str | None:
    """The id scontrol knows this job by (``<array job>_<task>`` for array jobs), or None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job() -> bool:
    """Requeue this SLURM job with ``scontrol requeue`` (first task only); True when the request was sent.

    Outside SLURM, on tasks other than SLURM_PROCID 0, or without scontrol, nothing happens and False is
    returned (with a log line saying why).
    """
    job_id = slurm_job_id()
    if job_id is None:
        logger.info("preemption: not running under SLURM, not requeueing")
        return False
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        logger.warning("preemption: scontrol not found on PATH, cannot requeue SLURM job %s", job_id)
        return False
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        logger.warning("preemption: 'scontrol requeue %s' failed: %s", job_id, result.stderr.strip())
        return False
    logger.info("preemption: requeued SLURM job %s", job_id)
    return True
