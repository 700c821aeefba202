"""Distributed faults: when one rank dies or hangs, the others fail within the timeout naming it (no endless hang)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Rank 1 joins, then dies (or hangs); rank 0 enters a collective through the project's helpers.
WORKER = """
import os, sys, time
import torch
from run import distributed as rd
from util import distributed as du
mode = sys.argv[1]
rd.init_distributed_mode(torch.device("cpu"), "env://", 0.05)  # 3 s
if du.get_rank() == 1:
    if mode == "die":
        os._exit(3)
    time.sleep(60)
try:
    du.all_reduce_sum(torch.ones(1))
except RuntimeError as e:
    failure = rd.peer_failure(e, timeout_s=2)
    if failure is None:
        sys.exit(f"unexplained: {e}")
    rd.exit_after_peer_failure(failure)
sys.exit("error: the collective succeeded")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_is_named_within_the_timeout(mode):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, mode],
            cwd=ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    start = time.monotonic()
    try:
        _, stderr = procs[0].communicate(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    elapsed = time.monotonic() - start
    assert procs[0].returncode == 1, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank 0: a collective failed because rank(s) 1 of 2 died"), stderr[-2000:]
    assert "--resume auto" in line
    assert elapsed < 30
