"""CPU intra-op threads of the main process (``--threads``), chosen once at start-up and shown in its line."""

from __future__ import annotations

import os

import torch

__all__ = ["busy_hint", "choose_threads", "usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or SLURM's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS / Windows have no affinity mask
        return os.cpu_count() or 1


def choose_threads(requested: int | None, device_type: str, num_workers: int) -> tuple[int, str]:
    """(intra-op threads, why) for ``--threads``; None picks them.

    Without ``--threads``: OMP_NUM_THREADS when set (torch already follows it); on CUDA/MPS torch's own default
    (the GPU does the work); on a CPU the usable cores minus the data-loader workers (each of which computes on
    a core of its own), at least 1 and at most torch's default. More threads than free cores make OpenMP's
    waiting threads fight over them: 10x slower steps for small models are common on a shared machine.

    Raises:
        ValueError: ``requested`` below 1.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: expected 1 or more")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if device_type != "cpu":
        return torch.get_num_threads(), "torch default"
    cores = usable_cores()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: the processes sharing this machine
    threads = max(1, min(torch.get_num_threads(), cores // max(processes, 1) - num_workers))
    why = f"auto: {cores} usable cores, {num_workers} data workers" + (f", {processes} processes" if processes > 1
                                                                        else "")  # fmt: skip
    return threads, why


def busy_hint(threads: int) -> str:
    """'' or a hint that the machine was already busy at start-up (where --threads 1 is often much faster)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores = usable_cores()
    if threads > 1 and load >= cores:
        return f"; the machine is busy (load {load:.1f} on {cores} cores): --threads 1 may be much faster"
    return ""
