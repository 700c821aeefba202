"""Capture and restore every random number generator a training step touches, for exact resume.

States are stored as tensors and plain ints/lists so checkpoints stay ``torch.load(weights_only=True)``-loadable.
The states are those of the calling process; under DDP each rank has its own (gather them to save all).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the python, numpy, torch CPU and (when available) CUDA/MPS generators.

    Returns:
        {'python': [version, [625 ints], gauss_next], 'numpy': {'keys': int64 [624], 'pos', 'has_gauss',
        'cached_gaussian'}, 'torch': uint8 tensor, 'cuda': list of uint8 tensors (one per device, if any),
        'mps': uint8 tensor (if any)}.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by `capture_rng_state`; missing entries are left as they are.

    A CUDA state saved with a different number of devices restores the common devices and logs a warning.
    """
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    if "numpy" in state:
        s = state["numpy"]
        keys = torch.as_tensor(s["keys"]).numpy().astype(np.uint32)
        np.random.set_state((s.get("kind", "MT19937"), keys, int(s["pos"]), int(s["has_gauss"]), s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("cuda") and torch.cuda.is_available():
        saved = state["cuda"]
        count = torch.cuda.device_count()
        if len(saved) != count:
            logger.warning(
                "rng state: checkpoint has %d CUDA generator(s), this process sees %d; restoring the first %d",
                len(saved),
                count,
                min(len(saved), count),
            )
        for device, device_state in enumerate(saved[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(device_state, dtype=torch.uint8).cpu(), device)
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(torch.as_tensor(state["mps"], dtype=torch.uint8).cpu())


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the block without moving any generator `capture_rng_state` covers (restored on exit, also on error).

    For work between a checkpoint and the next training step, e.g. an evaluation whose data loader draws its
    seed from the global torch generator: the checkpoint's RNG state must stay the one training continues from.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
