"""Resume semantics: the checkpoint's schedule wins with one warning line; --keep_new_schedule keeps the new one."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import FAMILY_FLAGS, TINY_FLAGS, parse_tiny_args
from torch import nn

import main as main_module
import models
from main import build_optimizer
from run.checkpoint import CheckpointError, save_checkpoint
from run.lr_warmup import LinearWarmup, step_epoch_scheduler
from run.recipe import build_lr_scheduler
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


# ----------------------------------------------------------------------- --keep_new_schedule for every family


def _family_args(family: str, *extra: str):
    """A tiny model of ``family`` with its family defaults (RT-DETRv2: norm weight decay 0, its role groups)."""
    return main_module.parse_args([*TINY_FLAGS, *FAMILY_FLAGS[family], "--num_classes", "3", *extra])


def _family_state(args) -> TrainState:
    """The training state main builds: groups, epoch scheduler, then the warm-up (which lowers the lr)."""
    torch.manual_seed(0)
    model = models.build_model(args, 3)[0]
    optimizer = build_optimizer(model, args)
    scheduler = build_lr_scheduler(optimizer, args)
    warmup = LinearWarmup(optimizer, args.warmup_iters) if args.warmup_iters > 0 else None
    return TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), warmup=warmup)


def _train(state: TrainState, epochs: int, steps: int) -> None:
    """Main's loop without data: a warm-up step after every optimizer step, the epoch scheduler after each epoch."""
    for _ in range(epochs):
        for _ in range(steps):
            state.optimizer.step()
            if state.warmup is not None:
                state.warmup.step()
        step_epoch_scheduler(state.lr_scheduler, state.warmup)


def _resumed(tmp_path, family: str, old: list[str], new: list[str], epochs: int, steps: int) -> TrainState:
    """Train ``epochs`` x ``steps`` with flags ``old``, checkpoint, resume with ``new`` and --keep_new_schedule."""
    trained = _family_state(_family_args(family, *old))
    _train(trained, epochs, steps)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(trained.checkpoint(_family_args(family, *old), epochs - 1), path)
    args = _family_args(family, *new, "--resume", str(path), "--keep_new_schedule")
    state = _family_state(args)
    load_weights(args, state)
    return state


def _expected_bases(state: TrainState, base_of) -> list[tuple[float, float]]:
    """(base lr, weight decay) of every group from its parameters' names: ``base_of(name, is_norm)``, which must
    agree for all parameters of a group."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    norms = {id(p) for m in state.model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    names = {id(p): n for n, p in state.model.named_parameters()}
    bases = []
    for group in state.optimizer.param_groups:
        values = {base_of(names[id(p)], id(p) in norms) for p in group["params"]}
        assert len(values) == 1, values
        bases.append(values.pop())
    return bases


def _check(state: TrainState, bases: list[tuple[float, float]], factor: float) -> None:
    groups = state.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([lr * factor for lr, _ in bases], rel=1e-9)
    assert [g["weight_decay"] for g in groups] == pytest.approx([wd for _, wd in bases], rel=1e-12)


def test_keep_new_schedule_rebases_rtdetrv2_role_groups_after_the_warmup(tmp_path):
    old = ["--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_drop", "100", "--warmup_iters", "4"]
    new = ["--lr", "5e-4", "--lr_backbone", "2e-5", "--lr_drop", "2", "--warmup_iters", "4", "--weight_decay", "0.05"]
    # Epoch 0 ends inside the warm-up (3 of 4 steps): the scheduler steps after epochs 1 and 2 only.
    state = _resumed(tmp_path, "rtdetrv2", old, new, epochs=3, steps=3)
    assert state.lr_scheduler.last_epoch == 2 and state.warmup.finished
    assert len(state.optimizer.param_groups) == 4  # backbone, backbone norms, norms, the rest

    def base_of(name: str, is_norm: bool) -> tuple[float, float]:
        return (2e-5 if name.startswith("backbone.") else 5e-4), (0.0 if is_norm else 0.05)

    bases = _expected_bases(state, base_of)
    assert sorted({lr for lr, _ in bases}) == [2e-5, 5e-4] and sorted({wd for _, wd in bases}) == [0.0, 0.05]
    for factor in (0.1, 0.1, 0.01):  # StepLR(2) at scheduler positions 2, 3, 4
        _check(state, bases, factor)
        state.lr_scheduler.step()


def test_keep_new_schedule_during_the_rtdetrv2_warmup_uses_the_new_length(tmp_path):
    old = ["--lr", "1e-3", "--lr_backbone", "1e-4", "--warmup_iters", "20"]
    new = ["--lr", "5e-4", "--lr_backbone", "1e-4", "--warmup_iters", "30"]
    state = _resumed(tmp_path, "rtdetrv2", old, new, epochs=1, steps=3)
    assert state.warmup.step_count == 3 and state.lr_scheduler.last_epoch == 0

    def base_of(name: str, is_norm: bool) -> tuple[float, float]:
        return (1e-4 if name.startswith("backbone.") else 5e-4), (0.0 if is_norm else 1e-4)

    bases = _expected_bases(state, base_of)
    _check(state, bases, 4 / 30)  # step 3 of a 30-step warm-up: factor (3 + 1) / 30
    for _ in range(26):
        state.optimizer.step()
        state.warmup.step()
    _check(state, bases, 1.0)  # step 29: (29 + 1) / 30
    assert not state.warmup.finished
    state.warmup.step()
    _check(state, bases, 1.0)
    assert state.warmup.finished


def test_keep_new_schedule_rebases_deformable_detr_groups_with_new_milestones(tmp_path):
    old = ["--lr", "2e-4", "--lr_backbone", "2e-5", "--lr_drop", "40"]
    new = ["--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_drop_epochs", "2", "4"]
    state = _resumed(tmp_path, "deformable_detr", old, new, epochs=3, steps=1)
    assert state.lr_scheduler.last_epoch == 3 and state.warmup is None

    def base_of(name: str, is_norm: bool) -> tuple[float, float]:
        if "backbone" in name:
            return 1e-4, 1e-4
        if "reference_points" in name or "sampling_offsets" in name:
            return 1e-3 * 0.1, 1e-4  # --lr_linear_proj_mult 0.1
        return 1e-3, 1e-4

    bases = _expected_bases(state, base_of)
    assert len(bases) == 3 and {lr for lr, _ in bases} == {1e-3, 1e-4}  # 1e-3 x 0.1 == 1e-4 up to rounding
    for factor in (0.1, 0.01, 0.01):  # scheduler positions 3, 4, 5: milestones 2 and 4
        _check(state, bases, factor)
        state.lr_scheduler.step()


def test_new_flags_that_regroup_the_parameters_are_refused_in_one_line(tmp_path):
    old = ["--lr", "1e-3", "--lr_backbone", "1e-4", "--warmup_iters", "0"]
    # lr == lr_backbone: RT-DETRv2's backbone and other groups (and the norm groups) merge, 4 groups become 2.
    with pytest.raises(CheckpointError, match=r"has 4 parameter groups .* build 2 of") as error:
        _resumed(tmp_path, "rtdetrv2", old, ["--lr", "1e-4", "--lr_backbone", "1e-4", "--warmup_iters", "0"], 1, 1)
    assert "\n" not in str(error.value)


def test_checkpoint_without_warmup_resumed_with_one_starts_no_warmup(tmp_path):
    """A checkpoint trained without a warm-up, resumed with --warmup_iters (no --keep_new_schedule): the
    checkpoint's schedule is kept, so the next steps run at the checkpoint's lrs, not a warm-up from step 0."""
    old = ["--lr", "1e-3", "--lr_backbone", "1e-4", "--warmup_iters", "0"]
    trained = _family_state(_family_args("rtdetrv2", *old))
    _train(trained, 2, 3)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(trained.checkpoint(_family_args("rtdetrv2", *old), 1), path)
    lrs = [g["lr"] for g in trained.optimizer.param_groups]
    args = _family_args("rtdetrv2", *old[:-1], "10", "--resume", str(path))
    state = _family_state(args)
    load_weights(args, state)
    assert state.warmup is not None and state.warmup.finished
    for _ in range(3):
        state.optimizer.step()
        state.warmup.step()
        assert [g["lr"] for g in state.optimizer.param_groups] == lrs
