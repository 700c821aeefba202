"""Shared seeded fixtures: tiny model arguments that build offline in well under a second."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from main import get_args_parser  # noqa: E402

# Tests run as `pytest -n 2`: one intra-op thread per worker avoids oversubscribing the cores (up to 10x slower).
torch.set_num_threads(1)

TINY_FLAGS = [
    "--backbone", "resnet18",
    "--backbone_weights", "none",
    "--hidden_dim", "32",
    "--nheads", "2",
    "--enc_layers", "1",
    "--dec_layers", "2",
    "--dim_feedforward", "64",
    "--num_queries", "10",
    "--dropout", "0.0",
    "--device", "cpu",
    "--num_workers", "0",
]  # fmt: skip


# Run flags per detector family (``--model`` first). DINO refuses --lr_backbone 0 (published: "Please set
# lr_backbone > 0"), so its runs train the backbone slowly; few detections and denoising queries keep them fast.
FAMILY_FLAGS = {
    "detr": ("--model", "detr"),
    "deformable_detr": ("--model", "deformable_detr"),
    "dino": ("--model", "dino", "--lr_backbone", "1e-5", "--num_select", "20", "--dn_number", "4"),
}


def parse_tiny_args(*extra: str):
    """Parse the tiny model flags plus ``extra`` (later flags win)."""
    return get_args_parser().parse_args([*TINY_FLAGS, *extra])


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
