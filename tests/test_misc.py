"""util.misc: NestedTensor padding, masks, size_divisibility and collation."""

from __future__ import annotations

import functools

import pytest
import torch

from util.misc import NestedTensor, collate_fn, nested_tensor_from_tensor_list


def test_padding_goes_bottom_right_and_mask_marks_it():
    a = torch.rand(3, 4, 6)
    b = torch.rand(3, 5, 3)
    nested = nested_tensor_from_tensor_list([a, b])
    images, mask = nested.decompose()
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    torch.testing.assert_close(images[0, :, :4, :6], a)
    torch.testing.assert_close(images[1, :, :5, :3], b)
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    expected = torch.ones(2, 5, 6, dtype=torch.bool)
    expected[0, :4, :6] = False
    expected[1, :5, :3] = False
    assert torch.equal(mask, expected)


def test_size_divisibility_rounds_up_both_sides():
    nested = nested_tensor_from_tensor_list([torch.rand(3, 33, 20), torch.rand(3, 10, 64)], size_divisibility=32)
    assert nested.tensors.shape == (2, 3, 64, 64)
    assert (~nested.mask[0]).sum() == 33 * 20 and (~nested.mask[1]).sum() == 10 * 64
    same = nested_tensor_from_tensor_list([torch.rand(3, 32, 32)], size_divisibility=32)
    assert same.tensors.shape == (1, 3, 32, 32) and not same.mask.any()


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        nested_tensor_from_tensor_list([])
    with pytest.raises(ValueError, match="C, H, W"):
        nested_tensor_from_tensor_list([torch.rand(4, 4)])
    with pytest.raises(ValueError, match="size_divisibility"):
        nested_tensor_from_tensor_list([torch.rand(3, 4, 4)], size_divisibility=0)


def test_to_moves_tensors_and_mask_and_repr():
    nested = nested_tensor_from_tensor_list([torch.rand(3, 4, 4)]).to(torch.device("cpu"))
    assert isinstance(nested, NestedTensor) and nested.mask.device.type == "cpu"
    assert "NestedTensor" in repr(nested)
    assert NestedTensor(torch.rand(1, 3, 2, 2), None).to("cpu").mask is None


def test_collate_fn_batches_images_and_keeps_targets():
    batch = [(torch.rand(3, 8, 6), {"id": 1}), (torch.rand(3, 6, 9), {"id": 2})]
    images, targets = collate_fn(batch)
    assert images.tensors.shape == (2, 3, 8, 9) and targets == ({"id": 1}, {"id": 2})
    images, _ = functools.partial(collate_fn, size_divisibility=16)(batch)
    assert images.tensors.shape == (2, 3, 16, 16)
