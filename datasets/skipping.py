"""--skip_bad_images for map-style datasets: warn, count, and substitute or drop unreadable samples."""

from __future__ import annotations

import logging
from typing import Any

import torch

from datasets.errors import DatasetError

logger = logging.getLogger(__name__)

# Slots of the shared skip counter: one per DataLoader worker (slot 0 = the main process), so counts from
# concurrent workers never race.
_COUNTER_SLOTS = 256
# A training sample that cannot be read is replaced by the next index at most this many times in a row.
MAX_SUBSTITUTIONS = 32


class SkippingDataset(torch.utils.data.Dataset):
    """Base class: ``__getitem__`` calls ``load_sample(index)`` and handles its :class:`DatasetError`.

    Without ``skip_bad_images`` the error propagates. With it, a one-line warning is logged (once per sample and
    process: the trainer logs the count per epoch), the skip is counted
    (``skipped``, summed over DataLoader workers through shared memory), and either the next readable sample is
    returned (``substitute_bad``: training keeps a constant batch size, so distributed ranks stay in step) or
    ``None`` (evaluation: ``util.misc.collate_fn`` drops it).
    """

    def __init__(self, skip_bad_images: bool = False, substitute_bad: bool = False):
        self.skip_bad_images = skip_bad_images
        self.substitute_bad = substitute_bad
        self._skip_counts = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        self._warned: set[int] = set()  # indices already reported by this process (not every epoch again)

    def load_sample(self, index: int) -> Any:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Samples skipped so far (all workers)."""
        return int(self._skip_counts.sum())

    def __getitem__(self, index: int) -> Any:
        for _ in range(MAX_SUBSTITUTIONS):
            try:
                return self.load_sample(index)
            except DatasetError as err:
                if not self.skip_bad_images:
                    raise
                self._count_skip()
                if index not in self._warned:
                    self._warned.add(index)
                    logger.warning("skipping sample %d: %s", index, err)
                if not self.substitute_bad:
                    return None
                index = (index + 1) % len(self)
        raise DatasetError(
            f"{getattr(self, 'img_folder', type(self).__name__)}: {MAX_SUBSTITUTIONS} unreadable samples in a row; "
            "the dataset looks broken"
        )

    def _count_skip(self) -> None:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (_COUNTER_SLOTS - 1)
        self._skip_counts[slot] += 1
