"""RNG capture/restore reproduces the same random streams, also through a weights_only checkpoint."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from run.checkpoint import load_checkpoint, save_checkpoint
from run.rng_state import capture_rng_state, preserved_rng_state, restore_rng_state


def _draw() -> dict:
    """Numbers from every generator, including the cached-gaussian paths of python and numpy."""
    return {
        "python": [random.random(), random.gauss(0, 1), random.randint(0, 10**9)],
        "numpy": [np.random.rand(4).tolist(), np.random.standard_normal(3).tolist(), np.random.randint(10**6)],
        "torch": [torch.rand(4), torch.randn(3), torch.randint(0, 10**6, (2,)), torch.randperm(7)],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["python"] == b["python"]
    assert a["numpy"] == b["numpy"]
    for x, y in zip(a["torch"], b["torch"]):
        assert torch.equal(x, y)


def _advance() -> None:
    # Leave a pending cached gaussian in python and numpy so that part of the state matters too.
    random.gauss(0, 1)
    np.random.standard_normal(1)
    torch.randn(5)


@pytest.mark.parametrize("through_file", [False, True], ids=["in_memory", "checkpoint"])
def test_restore_reproduces_all_generators(tmp_path, through_file):
    _advance()
    state = capture_rng_state()
    if through_file:
        save_checkpoint({"rng_state": state}, tmp_path / "c.pth")
        state = load_checkpoint(tmp_path / "c.pth")["rng_state"]
    first = _draw()
    second = _draw()
    with pytest.raises(AssertionError):
        _assert_same(first, second)  # the streams really moved on
    restore_rng_state(state)
    _assert_same(_draw(), first)


@pytest.mark.parametrize("name", ["python", "numpy", "torch"])
def test_each_generator_is_restored(name):
    _advance()
    state = capture_rng_state()
    first = _draw()
    restore_rng_state({name: state[name]})  # only this one generator goes back
    again = _draw()
    if name == "torch":
        assert all(torch.equal(x, y) for x, y in zip(again[name], first[name]))
    else:
        assert again[name] == first[name]
    other = "numpy" if name == "python" else "python"
    assert again[other] != first[other]


def test_state_holds_only_weights_only_types():
    state = capture_rng_state()
    assert isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
    assert state["numpy"]["keys"].shape == (624,)
    assert len(state["python"][1]) == 625


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_are_restored():
    torch.randn(3, device="cuda")
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.randn(8, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.randn(8, device="cuda"), first)


@pytest.mark.parametrize("fail", [False, True])
def test_preserved_block_leaves_every_generator_where_it_was(fail):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = _draw()  # the streams right after seeding
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with preserved_rng_state():
            inside = _draw()
            torch.utils.data.DataLoader(list(range(3))).__iter__()  # draws a base seed from the torch generator
            if fail:
                raise RuntimeError("an evaluation that fails")
    after = _draw()
    _assert_same(after, expected)
    _assert_same(inside, expected)  # the block itself drew from the same (not reseeded) streams
