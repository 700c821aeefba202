"""The few collectives training and evaluation need; each also works without a process group (one process:
reductions return their input). Set-up (torchrun / SLURM, devices, failures) lives in ``run.distributed``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "get_rank",
    "get_world_size",
    "is_dist_avail_and_initialized",
    "is_main_process",
    "reduce_dict",
]


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """Only this process writes files and prints progress."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over processes (a new tensor; the input is returned unchanged with one process)."""
    if get_world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out / get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (a new tensor with several processes)."""
    if get_world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors (same keys on every process) in one collective; detached."""
    if get_world_size() == 1:
        return {k: v.detach() for k, v in values.items()}
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= get_world_size()
    return dict(zip(names, stacked))


def all_gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every process; a one-element list with one process."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
