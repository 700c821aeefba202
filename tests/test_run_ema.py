"""ModelEMA: the published ramped-decay arithmetic against a plain loop, buffers, DDP unwrap, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from run.ema import ModelEMA, build_ema, unwrap_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    model.train()
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def _setup():
    model = _model()
    model.eval()(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer (eval: BN counts no batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer


def test_decay_ramp_hand_values():
    ema = ModelEMA(nn.Linear(1, 1), decay=0.9999, warmups=2000)
    assert ema.decay_at(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay_at(1) == pytest.approx(4.99875e-4, rel=1e-4)
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - 1 / math.e))
    assert ema.decay_at(10**6) == pytest.approx(0.9999)


def test_update_matches_hand_loop_over_steps():
    model, optimizer = _setup()
    ema = ModelEMA(model, decay=0.9, warmups=3)  # small values so every step moves the average visibly
    reference = {k: v.clone().double() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        _train_step(model, optimizer, seed=step)
        ema.update(model)
        d = 0.9 * (1 - math.exp(-step / 3))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                reference[key] = d * reference[key] + (1 - d) * value.double()
            else:
                reference[key] = value.clone()
    assert ema.updates == 5
    for key, value in ema.module.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value.double(), reference[key], rtol=1e-6, atol=1e-7, msg=key)
            assert not torch.equal(value, model.state_dict()[key]), key  # really an average, not a copy
        else:
            assert torch.equal(value, reference[key]), key
    # BN running statistics (float buffers) are averaged; num_batches_tracked (int) is copied.
    assert int(ema.module.state_dict()["1.num_batches_tracked"]) == 5


def test_ema_module_is_frozen_copy_in_eval():
    model, optimizer = _setup()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    _train_step(model, optimizer, seed=1)
    ema.update(model)
    assert all(p.grad is None for p in ema.module.parameters())
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()


def test_unwraps_data_parallel_like_ddp():
    model, optimizer = _setup()
    wrapped = nn.DataParallel(model)  # CPU-only: DataParallel forwards to .module like DDP
    assert unwrap_model(wrapped) is model
    ema = ModelEMA(wrapped, decay=0.5, warmups=1)
    assert list(ema.module.state_dict()) == list(model.state_dict())
    before = copy.deepcopy(ema.module.state_dict())
    _train_step(model, optimizer, seed=1)
    ema.update(wrapped)
    d = 0.5 * (1 - math.exp(-1))
    expected = d * before["0.weight"] + (1 - d) * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, expected)


def test_resume_mid_run_equals_uninterrupted():
    model, optimizer = _setup()
    ema = ModelEMA(model, decay=0.99, warmups=4)
    for step in range(3):
        _train_step(model, optimizer, seed=step)
        ema.update(model)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()})
    assert set(saved["ema"]) == {"module", "updates"} and saved["ema"]["updates"] == 3
    for step in range(3, 6):
        _train_step(model, optimizer, seed=step)
        ema.update(model)

    resumed_model, resumed_optimizer = _setup()
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_ema = ModelEMA(resumed_model, decay=0.99, warmups=4)
    resumed_ema.load_state_dict(saved["ema"])
    assert resumed_ema.updates == 3
    for step in range(3, 6):
        _train_step(resumed_model, resumed_optimizer, seed=step)
        resumed_ema.update(resumed_model)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, resumed_ema.module.state_dict()[key]), key


def test_bad_arguments_and_states():
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(nn.Linear(1, 1), decay=1.0)
    with pytest.raises(ValueError, match="warmups"):
        ModelEMA(nn.Linear(1, 1), warmups=0)
    with pytest.raises(KeyError, match="module"):
        ModelEMA(nn.Linear(1, 1)).load_state_dict({"updates": 1})
    with pytest.raises(KeyError, match="differ"):
        ModelEMA(nn.Linear(1, 1)).update(nn.Sequential(nn.Linear(1, 1)))
    assert build_ema(nn.Linear(1, 1), 0.0, 2000) is None
    assert isinstance(build_ema(nn.Linear(1, 1), 0.9999, 2000), ModelEMA)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_model_device():
    model = nn.Linear(2, 2).cuda()
    ema = ModelEMA(model)
    assert ema.module.weight.is_cuda
    ema.update(model)
    assert ema.to("cpu").module.weight.device.type == "cpu"
    ema.update(model)  # CUDA weights averaged into the CPU copy
