"""Shared fixtures (seeding, environment restore, ``tiny_args``); the helpers tests import are in ``helpers.py``."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from helpers import parse_tiny_args

# Tests run as `pytest -n 2`: one intra-op thread per worker avoids oversubscribing the cores (up to 10x slower).
torch.set_num_threads(1)


@pytest.fixture
def tiny_args():
    """Factory: ``tiny_args('--masks', ...)`` -> argparse.Namespace of a tiny CPU model."""
    return parse_tiny_args


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_environment():
    """Launcher code under test writes RANK/WORLD_SIZE/MASTER_* into os.environ; left behind, they make a later
    main() in the same worker wait forever for a process group."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
