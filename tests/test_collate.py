"""Collation into NestedTensor: zero padding bottom/right, padding masks, size_divisibility, skipped samples."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from util.misc import collate_fn

SHAPES = [(3, 20, 31), (3, 33, 17), (3, 8, 8)]


def _batch(shapes=SHAPES):
    return [(torch.rand(shape) + 0.5, {"image_id": torch.tensor([i])}) for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("divisor, padded_hw", [(1, (33, 31)), (16, (48, 32)), (32, (64, 32)), (11, (33, 33))])
def test_padding_and_masks(divisor, padded_hw):
    batch = _batch()
    samples, targets = collate_fn(batch, size_divisibility=divisor)
    tensors, mask = samples.decompose()
    assert tuple(tensors.shape) == (3, 3, *padded_hw) and tuple(mask.shape) == (3, *padded_hw)
    assert mask.dtype == torch.bool and [t["image_id"].item() for t in targets] == [0, 1, 2]
    for k, (image, _) in enumerate(batch):
        _, h, w = image.shape
        expected_mask = torch.ones(padded_hw, dtype=torch.bool)
        expected_mask[:h, :w] = False  # True exactly on padding
        assert torch.equal(mask[k], expected_mask)
        assert torch.equal(tensors[k, :, :h, :w], image)
        assert (tensors[k][:, expected_mask] == 0).all()  # zero padding


def test_partial_collate_in_a_dataloader_and_single_image():
    loader = torch.utils.data.DataLoader(_batch(), batch_size=2, collate_fn=partial(collate_fn, size_divisibility=8))
    shapes = [tuple(samples.tensors.shape) for samples, _ in loader]
    assert shapes == [(2, 3, 40, 32), (1, 3, 8, 8)]
    samples, _ = collate_fn(_batch([(3, 5, 7)]))
    assert not samples.mask.any() and tuple(samples.tensors.shape) == (1, 3, 5, 7)


def test_skipped_samples_are_dropped():
    batch = _batch()
    samples, targets = collate_fn([None, batch[0], None, batch[2]])
    assert samples.tensors.shape[0] == 2 and [t["image_id"].item() for t in targets] == [0, 2]
    assert collate_fn([None, None]) == (None, ())
