"""Distributed set-up from torchrun/SLURM variables, the collectives, and a real 2-process gloo group."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from run import distributed as run_distributed
from util import distributed as dist_utils
from util.logging import MetricTracker

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_NODELIST", "SLURM_STEP_NODELIST", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    assert run_distributed.launcher_ranks() == (5, 8, 1)


def test_slurm_variables_set_the_rendezvous(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NODELIST", "gpu[017-018,20]")
    assert run_distributed._env_ranks() == (3, 4, 1)
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("gpu017", "3", "4")


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("a[3-5]", "a3"), ("gpu[007,9]", "gpu007"), ("x12,y[1-2]", "x12")],
)
def test_first_slurm_host(nodelist, host):
    assert run_distributed._first_slurm_host(nodelist) == host


def test_single_process_defaults(clean_env):
    assert run_distributed.launcher_ranks() == (0, 1, 0)
    state = run_distributed.init_distributed_mode(torch.device("cpu"), "env://", 1)
    assert (state.distributed, state.rank, state.world_size) == (False, 0, 1)
    clean_env.setenv("SLURM_PROCID", "0")  # an interactive allocation of one task is not distributed
    clean_env.setenv("SLURM_NTASKS", "1")
    assert not run_distributed.init_distributed_mode(torch.device("cpu"), "env://", 1).distributed
    assert dist_utils.get_world_size() == 1 and dist_utils.is_main_process()
    values = {"a": torch.tensor(2.0, requires_grad=True)}
    assert not dist_utils.reduce_dict(values)["a"].requires_grad
    assert dist_utils.all_gather_object({"x": 1}) == [{"x": 1}]


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    state = run_distributed.init_distributed_mode(torch.device("cpu"), "env://", 1)
    reduced = dist_utils.reduce_dict({"loss": torch.tensor(float(rank + 1)), "b": torch.tensor(10.0 * rank)})
    tracker = MetricTracker()
    tracker.update(n=rank + 1, loss=float(rank))  # rank 0: one sample of 0, rank 1: two samples of 1
    tracker.add("overflows", rank + 1)
    tracker.synchronize()
    gathered = dist_utils.all_gather_object({"rank": rank})
    queue.put((rank, state.distributed, {k: v.item() for k, v in reduced.items()}, tracker.means(), gathered))
    run_distributed.cleanup()


def test_two_process_collectives():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # no re-import of torch: seconds faster than spawn
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, port, queue), nprocs=2, start_method="fork")
    results = sorted(queue.get() for _ in range(2))
    assert [r[0] for r in results] == [0, 1]
    for _, distributed, reduced, means, gathered in results:
        assert distributed
        assert reduced == {"loss": 1.5, "b": 5.0}  # means over the two processes
        assert means["loss"] == pytest.approx(2 / 3)  # weighted by counts across processes
        assert means["overflows"] == 3  # totals add up
        assert gathered == [{"rank": 0}, {"rank": 1}]
