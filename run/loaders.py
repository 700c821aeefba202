"""The training and evaluation DataLoaders of a run: sampling, collation, reproducible epochs and mid-epoch
resume (moved from main.py)."""

from __future__ import annotations

import argparse
import functools
import itertools
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from cli.config import UsageError
from util import distributed as dist_utils
from util.misc import collate_fn

__all__ = ["ResumableBatchSampler", "begin_epoch", "build_data_loaders"]


class ResumableBatchSampler(BatchSampler):
    """BatchSampler whose next pass starts ``skip`` batches in (a mid-epoch resume), without loading them."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


def _with_epoch(*stages: Any) -> list[Any]:
    """Those of ``stages`` that follow the epoch (a ``set_epoch`` method)."""
    return [stage for stage in stages if callable(getattr(stage, "set_epoch", None))]


def _epoch_stages(loader: DataLoader) -> list[Any]:
    """The loader's collate function and its dataset's transforms that follow the epoch (``set_epoch``)."""
    return _with_epoch(loader.collate_fn, getattr(loader.dataset, "transforms", None))


def build_data_loaders(args: argparse.Namespace, dataset_train, dataset_val, device: torch.device,
                       distributed: bool = False, train_collate=None):  # fmt: skip
    """(train loader or None, val loader): distributed or random/sequential sampling, padded collation
    (``train_collate``: a family's own training collation)."""
    common = dict(
        collate_fn=functools.partial(collate_fn, size_divisibility=args.size_divisibility),
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
    )
    sampler_val = DistributedSampler(dataset_val, shuffle=False) if distributed else SequentialSampler(dataset_val)
    loader_val = DataLoader(
        dataset_val, args.eval_batch_size or args.batch_size, sampler=sampler_val, drop_last=False, **common
    )
    if dataset_train is None:
        return None, loader_val
    if distributed:
        sampler_train = DistributedSampler(dataset_train, seed=args.seed)
    else:
        sampler_train = RandomSampler(dataset_train, generator=torch.Generator())
    batch_sampler = ResumableBatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise UsageError(
            f"the training set has {len(sampler_train)} images per process, fewer than --batch_size "
            f"{args.batch_size}; lower --batch_size or add images"
        )
    # Its own generator: the workers' base seed is drawn from it, not from the global torch RNG (which a
    # mid-epoch checkpoint captures after the epoch's iterator was created: an extra draw breaks exact resume).
    if train_collate is not None:
        common["collate_fn"] = train_collate
    if _with_epoch(common["collate_fn"], getattr(dataset_train, "transforms", None)):
        common["persistent_workers"] = False  # workers hold copies: new ones each epoch see the epoch (published)
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, generator=torch.Generator(), **common)
    return loader_train, loader_val


def begin_epoch(loader: DataLoader, epoch: int, seed: int, skip: int = 0) -> None:
    """Shuffle ``epoch`` in a reproducible order (seed + epoch, as DistributedSampler does) from batch ``skip``."""
    sampler = loader.batch_sampler.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(seed + epoch)
    loader.batch_sampler.skip = skip
    for stage in _epoch_stages(loader):  # e.g. augmentations and multi-scale sizes that stop at an epoch
        stage.set_epoch(epoch)
    if loader.generator is not None:  # worker seeds: a function of (seed, rank, epoch) only
        loader.generator.manual_seed((seed + dist_utils.get_rank()) * 100_003 + epoch)
