"""Padded image batches (NestedTensor) and the DataLoader collation that builds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


class NestedTensor:
    """A batch of images padded to a common size, with the mask of padded pixels.

    Attributes:
        tensors: [B, C, H, W] images, zero-padded at the bottom and right.
        mask: [B, H, W] bool, True on padding pixels (or None).
    """

    def __init__(self, tensors: Tensor, mask: Tensor | None):
        self.tensors = tensors
        self.mask = mask

    # `device` stays unannotated: TorchScript cannot resolve a `torch.device` annotation in a TorchScript class.
    def to(self, device, non_blocking: bool = False) -> NestedTensor:
        """Return a copy on ``device`` (tensors and mask move together)."""
        mask = self.mask
        if mask is not None:
            mask = mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    # Optional, not `Tensor | None`: TorchScript cannot read a union inside a TorchScript class's tuple annotation.
    def decompose(self) -> tuple[Tensor, Optional[Tensor]]:  # noqa: UP045
        """Return ``(tensors, mask)``."""
        return self.tensors, self.mask

    @torch.jit.unused
    def __repr__(self) -> str:
        mask_shape = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask_shape})"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def nested_tensor_from_tensor_list(tensor_list: list[Tensor], size_divisibility: int = 1) -> NestedTensor:
    """Pad [C, H_i, W_i] images (a list, tuple or [B, C, H, W] tensor of them) to one [B, C, H, W] batch.

    Padding goes to the bottom and right with zeros; the mask is True on padding. ``H`` and ``W`` are
    the largest height and width in the list, rounded up to a multiple of ``size_divisibility``
    (1 keeps the published behaviour; 32 or 64 gives fewer distinct shapes for compiled models).
    Scriptable with ``torch.jit.script`` (hence list comprehensions rather than generators).
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list needs at least one image")
    for image in tensor_list:
        if image.dim() != 3:
            raise ValueError(f"expected [C, H, W] images, got shapes {[list(t.shape) for t in tensor_list]}")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    first = tensor_list[0]
    channels = first.shape[0]
    height = _round_up(max([t.shape[1] for t in tensor_list]), size_divisibility)
    width = _round_up(max([t.shape[2] for t in tensor_list]), size_divisibility)
    batch = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for index, image in enumerate(tensor_list):
        batch[index, :, : image.shape[1], : image.shape[2]].copy_(image)
        mask[index, : image.shape[1], : image.shape[2]] = False
    return NestedTensor(batch, mask)


def collate_fn(batch: Sequence[tuple], size_divisibility: int = 1) -> tuple:
    """DataLoader collation: ``[(image, target), ...] -> (NestedTensor, (target, ...))``.

    Use ``functools.partial(collate_fn, size_divisibility=N)`` to pad to multiples of N. ``None`` samples
    (unreadable images skipped by the dataset with --skip_bad_images) are dropped; a batch with no sample
    left collates to ``(None, ())``, which the evaluation loop skips.
    """
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None, ()
    columns = list(zip(*batch))
    columns[0] = nested_tensor_from_tensor_list(columns[0], size_divisibility=size_divisibility)
    return tuple(columns)
