"""Resume semantics: the checkpoint's schedule wins with one warning line; --keep_new_schedule keeps the new one."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import parse_tiny_args
from torch import nn

from main import build_optimizer
from run.checkpoint import save_checkpoint
from run.run_state import TrainState, load_weights


class _Toy(nn.Module):
    """Two parameter groups like DETR's: 'backbone' parameters and the rest."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)


def _state(args) -> TrainState:
    model = _Toy()
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def _checkpoint(tmp_path, epochs_done: int = 3) -> str:
    """A checkpoint after ``epochs_done`` epochs of lr 1e-3 / lr_backbone 1e-4 / lr_drop 2."""
    args = parse_tiny_args("--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_drop", "2", "--epochs", "10")
    state = _state(args)
    for _ in range(epochs_done):
        state.optimizer.step()
        state.lr_scheduler.step()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state.checkpoint(args, epochs_done - 1), path)
    return str(path)


def _lrs(state: TrainState) -> list[float]:
    return [group["lr"] for group in state.optimizer.param_groups]


def test_overridden_schedule_flags_are_listed_in_one_warning(tmp_path, caplog):
    path = _checkpoint(tmp_path)
    args = parse_tiny_args("--lr", "5e-4", "--lr_backbone", "2e-5", "--lr_drop", "4", "--epochs", "20",
                           "--resume", path)  # fmt: skip
    state = _state(args)
    with caplog.at_level(logging.WARNING, logger="detr"):
        load_weights(args, state)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    for flag, old, new in [("lr", 0.001, 0.0005), ("lr_backbone", 0.0001, 2e-05), ("lr_drop", 2, 4)]:
        assert f"{flag}={old} (command line {new})" in warnings[0]
    assert "--keep_new_schedule" in warnings[0]
    assert "epochs" not in warnings[0]  # --epochs is not overridden: the run continues to the new end
    assert state.start_epoch == 3 and args.start_epoch == 0  # run state, not a rewritten flag
    # The checkpoint's schedule is what continues: lr 1e-3 dropped once at epoch 2, drop every 2 epochs.
    assert _lrs(state) == pytest.approx([1e-4, 1e-5])
    state.lr_scheduler.step()
    assert _lrs(state) == pytest.approx([1e-5, 1e-6])


def test_same_flags_resume_quietly(tmp_path, caplog):
    path = _checkpoint(tmp_path)
    args = parse_tiny_args("--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_drop", "2", "--epochs", "20",
                           "--resume", path)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="detr"):
        load_weights(args, _state(args))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_keep_new_schedule_uses_the_command_line_values(tmp_path, caplog):
    path = _checkpoint(tmp_path)
    flags = ["--lr", "5e-4", "--lr_backbone", "2e-5", "--lr_drop", "4", "--weight_decay", "0.05"]
    args = parse_tiny_args(*flags, "--resume", path, "--keep_new_schedule")
    state = _state(args)
    with caplog.at_level(logging.WARNING, logger="detr"):
        load_weights(args, state)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Independent reference: the new schedule from scratch, stepped the same 3 epochs.
    reference = _state(parse_tiny_args(*flags))
    for epoch in range(3, 9):
        for _ in range(epoch - reference.lr_scheduler.last_epoch):
            reference.optimizer.step()
            reference.lr_scheduler.step()
        assert _lrs(state) == pytest.approx(_lrs(reference)), epoch
        assert [g["weight_decay"] for g in state.optimizer.param_groups] == [0.05, 0.05]
        state.lr_scheduler.step()


def test_resuming_with_other_key_neutral_model_flags_warns(tmp_path, caplog):
    """--dilation / --spatial_prior / --box_refine keep the keys: a mismatch loads, so it must be named."""
    import models

    trained = parse_tiny_args("--spatial_prior", "gaussian", "--box_refine")
    model = models.build_model(trained)[0]
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(trained)}, path)
    args = parse_tiny_args("--eval", "--resume", str(path))
    with caplog.at_level(logging.WARNING, logger="detr"):
        load_weights(args, TrainState(models.build_model(args)[0], None, None, None))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "spatial_prior=gaussian (this run none)" in warnings[0]
    assert "box_refine=True (this run False)" in warnings[0] and "dilation" not in warnings[0]
    caplog.clear()
    same = parse_tiny_args("--eval", "--resume", str(path), "--spatial_prior", "gaussian", "--box_refine")
    with caplog.at_level(logging.WARNING, logger="detr"):
        load_weights(same, TrainState(models.build_model(same)[0], None, None, None))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
