"""Process-group set-up (torchrun or SLURM), device choice, and what a run does when a peer process fails.

The collectives themselves are in ``util.distributed``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from util.distributed import get_rank, get_world_size, is_dist_avail_and_initialized

log = logging.getLogger("detr")


class DeviceError(RuntimeError):
    """The requested device is not available on this machine."""


class PeerFailureError(RuntimeError):
    """A collective failed because other processes died or stopped answering (named in the message)."""


# Side gloo group used only to find which ranks still answer after a collective failed (any backend).
_probe_group: Any = None
# Messages of the errors gloo/nccl raise when a peer dies or a collective times out.
_PEER_FAILURE = re.compile(r"connection (closed|reset)|timed out|timeout|gloo|nccl|broken pipe", re.IGNORECASE)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(requested: str, explicit: bool, local_rank: int = 0) -> torch.device:
    """Resolve ``--device``: the default 'cuda' falls back to MPS, then CPU, with one warning.

    Args:
        requested: 'cuda', 'cuda:N', 'mps' or 'cpu'.
        explicit: whether the user asked for this device (command line or config); an explicit device
            that is missing is an error instead of a fall-back.
        local_rank: process index on this node; picks the GPU for 'cuda' without an index.

    Raises:
        DeviceError: an explicitly requested device is unavailable.
    """
    kind = requested.split(":")[0]
    if kind == "cuda":
        if torch.cuda.is_available():
            return torch.device(requested if ":" in requested else f"cuda:{local_rank % torch.cuda.device_count()}")
        if explicit:
            raise DeviceError(
                f"--device {requested} was requested but CUDA is not available (torch {torch.__version__}); "
                "pass --device cpu (or mps), or omit --device to fall back automatically"
            )
        fallback = "mps" if _mps_available() else "cpu"
        log.warning("warning: CUDA is not available; using --device %s instead (pass --device to choose)", fallback)
        return torch.device(fallback)
    if kind == "mps" and not _mps_available():
        raise DeviceError("--device mps was requested but MPS is not available; pass --device cpu")
    return torch.device(requested)


def _first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        return nodelist
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _env_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or SLURM variables, or None outside a launcher."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        # env:// needs a rendezvous address; the first node of the allocation is the same for every task.
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", ""))))
        env.setdefault("MASTER_PORT", "29500")
        env.setdefault("RANK", str(rank))
        env.setdefault("WORLD_SIZE", str(world))
        return rank, world, int(env.get("SLURM_LOCALID", 0))
    return None


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) announced by torchrun or SLURM; (0, 1, 0) outside a launcher."""
    return _env_ranks() or (0, 1, 0)


@dataclass(frozen=True)
class DistributedState:
    """Where this process stands in the run: ``rank`` of ``world_size`` processes, ``gpu`` = local rank."""

    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    gpu: int = 0


def init_distributed_mode(device: torch.device, dist_url: str = "env://", timeout_min: float = 10) -> DistributedState:
    """Join the process group described by the environment (torchrun or SLURM variables).

    nccl on CUDA, gloo otherwise; collectives fail after ``timeout_min`` minutes instead of hanging.
    One process (no launcher variables, or a world of 1) leaves torch.distributed uninitialised.
    """
    ranks = _env_ranks()
    if ranks is None or ranks[1] <= 1:
        return DistributedState()
    state = DistributedState(True, *ranks)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=float(timeout_min))
    dist.init_process_group(
        backend=backend, init_method=dist_url, world_size=state.world_size, rank=state.rank, timeout=timeout
    )
    global _probe_group
    _probe_group = dist.new_group(backend="gloo", timeout=timeout)
    log.info("distributed init (rank %d of %d, %s): %s", state.rank, state.world_size, backend, dist_url)
    return state


def unresponsive_ranks(timeout_s: float = 10.0) -> list[int]:
    """Ranks that do not answer a point-to-point ping on the probe group within ``timeout_s``.

    Rank 0 pings every rank (a dead one fails at once, a hung one times out); other ranks only learn
    whether rank 0 answers. Every surviving rank must call it (after a failed collective).
    """
    rank, world = get_rank(), get_world_size()
    timeout = datetime.timedelta(seconds=timeout_s)
    token = torch.zeros(1)

    def answered(work) -> bool:
        try:
            return bool(work.wait(timeout))
        except RuntimeError:
            return False

    if rank != 0:
        try:
            sent = dist.isend(token, 0, group=_probe_group)
        except RuntimeError:
            return [0]
        return [] if answered(sent) and answered(dist.irecv(token.clone(), 0, group=_probe_group)) else [0]
    received = {}
    for peer in range(1, world):
        try:
            received[peer] = dist.irecv(torch.zeros(1), peer, group=_probe_group)
        except RuntimeError:
            received[peer] = None
    dead = [peer for peer, work in received.items() if work is None or not answered(work)]
    for peer in sorted(set(received) - set(dead)):
        try:
            dist.isend(token, peer, group=_probe_group).wait(timeout)
        except RuntimeError:
            dead.append(peer)
    return sorted(dead)


def peer_failure(error: BaseException, timeout_s: float = 10.0) -> PeerFailureError | None:
    """A PeerFailureError naming the unresponsive ranks if ``error`` is a failed collective, else None."""
    if _probe_group is None or not is_dist_avail_and_initialized() or not _PEER_FAILURE.search(str(error)):
        return None
    dead = unresponsive_ranks(timeout_s)
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    who = f"rank(s) {', '.join(map(str, dead))} of {get_world_size()}" if dead else "another rank"
    return PeerFailureError(
        f"rank {get_rank()}: a collective failed because {who} died or stopped answering ({first}); "
        "check that rank's log, then restart with --resume auto"
    )


def exit_after_peer_failure(failure: PeerFailureError) -> NoReturn:
    """Print ``error: <failure>`` and end this process at once with status 1.

    A process group with a dead member cannot be torn down safely: gloo and nccl destructors can abort
    (SIGABRT, "terminate called without an active exception") or hang at interpreter exit, so skip them.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.write(f"error: {failure}\n")
    sys.stderr.flush()
    os._exit(1)


def cleanup() -> None:
    """Leave the process group (no-op when none)."""
    global _probe_group
    _probe_group = None
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
