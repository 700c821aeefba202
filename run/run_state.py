"""What a training checkpoint holds, and how a run starts from weights: --frozen_weights, --resume, --finetune.

Checkpoint positions follow util/checkpoint.py: 'epoch' is the last fully trained epoch, 'iteration' the
batches of the next epoch already trained (mid-epoch checkpoints only).
"""

from __future__ import annotations

import argparse
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli.config import config_dict
from models import FAMILIES
from run.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    inference_weights,
    load_checkpoint,
    resume_position,
)
from run.ema import ModelEMA
from run.lr_warmup import LinearWarmup
from run.recipe import build_lr_scheduler
from run.rng_state import capture_rng_state, restore_rng_state
from util import distributed as dist_utils
from util.logging import MetricTracker

log = logging.getLogger("detr")
# Flags whose values a resumed optimizer/scheduler/warm-up silently replaces.
SCHEDULE_FLAGS = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "norm_weight_decay", "bias_weight_decay",
                  "lr_drop", "lr_drop_epochs", "warmup_iters")  # fmt: skip
# Flags that change what the model computes without changing its state-dict keys: a checkpoint loads strictly
# under either value, so a mismatch would silently change the outputs. Values for checkpoints that predate them.
BEHAVIOUR_FLAGS = {"dilation": False, "spatial_prior": "none", "box_refine": False}


@dataclass
class TrainState:
    """The objects a training checkpoint saves and restores (``model`` without its DDP wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    # This process's statistics of the batches a mid-epoch checkpoint had trained (set by `restore`).
    resumed_metrics: dict[str, dict[str, float]] | None = None
    # One id per run, kept across resumes: --resume auto never mixes in another run's files of the folder.
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # The epoch the run starts at (--start_epoch, or the resumed checkpoint's next epoch: ``load_weights``).
    start_epoch: int = 0
    # The dataset's {category id: name}, stored so predict.py names classes without --categories.
    class_names: dict[int, str] | None = None
    # --ema_decay > 0: the averaged weights (evaluated, saved as the published 'ema' entry {module, updates}).
    ema: ModelEMA | None = None
    # --warmup_iters > 0: the per-step linear warm-up (saved as 'lr_warmup').
    warmup: LinearWarmup | None = None

    def checkpoint(
        self, args: argparse.Namespace, epoch: int, iteration: int = 0, metrics: MetricTracker | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict (a collective: every process must call it; rank r's RNG state is entry r).

        ``metrics``: the running epoch statistics, saved (per rank) with a mid-epoch checkpoint.
        """
        ckpt = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch,
            "args": config_dict(args),
            "rng_state": dist_utils.all_gather_object(capture_rng_state()),
            "run_id": self.run_id,
        }
        if self.class_names:
            ckpt["class_names"] = dict(self.class_names)
        if self.ema is not None:
            ckpt["ema"] = self.ema.state_dict()
        if self.warmup is not None:
            ckpt["lr_warmup"] = self.warmup.state_dict()
        if iteration:
            ckpt["iteration"] = iteration
            if metrics is not None:
                local = {"sums": dict(metrics.sums), "counts": dict(metrics.counts), "totals": dict(metrics.totals)}
                ckpt["epoch_metrics"] = dist_utils.all_gather_object(local)
        if self.scaler.is_enabled():
            ckpt["scaler"] = self.scaler.state_dict()
        return ckpt

    def restore(self, ckpt: dict[str, Any], args: argparse.Namespace) -> tuple[int, int]:
        """Load optimizer, scheduler, scaler and RNG states of a training checkpoint; (start epoch, iteration)."""
        # This run's flags built the groups: their (base lr, weight decay) before loading are the new schedule's.
        built = [(float(g.get("initial_lr", g["lr"])), float(g["weight_decay"])) for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(_group_mismatch(ckpt["optimizer"], self.optimizer, e)) from None
        self.run_id = str(ckpt.get("run_id") or self.run_id)
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if self.warmup is not None and "lr_warmup" in ckpt:
            self.warmup.load_state_dict(ckpt["lr_warmup"])
        elif self.warmup is not None and not args.keep_new_schedule:
            # The checkpoint trained without a warm-up; its schedule is kept, so none starts mid-run.
            self.warmup.load_state_dict({"warmup_iters": 0, "step_count": 0, "base_lrs": self.warmup.base_lrs})
        _reconcile_schedule(args, ckpt, self.optimizer, self.lr_scheduler, built, self.warmup)
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        states = ckpt.get("rng_state")
        if isinstance(states, list) and len(states) == dist_utils.get_world_size():
            restore_rng_state(states[dist_utils.get_rank()])
        metrics = ckpt.get("epoch_metrics")
        if isinstance(metrics, list) and len(metrics) == dist_utils.get_world_size():
            self.resumed_metrics = metrics[dist_utils.get_rank()]
        return resume_position(ckpt)

    def epoch_tracker(self, resuming: bool) -> MetricTracker:
        """A MetricTracker for the next epoch, holding the restored statistics when resuming mid-epoch."""
        tracker = MetricTracker()
        if resuming and self.resumed_metrics:
            for name in ("sums", "counts", "totals"):
                getattr(tracker, name).update(self.resumed_metrics.get(name, {}))
        self.resumed_metrics = None
        return tracker


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """checkpoint.pth, plus checkpointNNNN.pth before each LR drop and every 100 epochs (published rule)."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % lr_drop == 0 or (epoch + 1) % 100 == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


def load_weights(args: argparse.Namespace, state: TrainState) -> int:
    """Apply --frozen_weights, --resume (path, https URL or 'auto') and --finetune to a fresh model.

    A training resume also restores the optimizer, scheduler, scaler and RNG states and sets
    ``state.start_epoch``; returns the batches of that epoch already trained (0 at an epoch boundary).
    """
    if args.frozen_weights:
        frozen = load_checkpoint(args.frozen_weights, hint="check the --frozen_weights path")
        _load_model(state.model.detr, frozen, args.frozen_weights, args)
    resume = args.resume
    if resume == "auto":
        if not args.output_dir:
            raise CheckpointError("--resume auto continues from the checkpoints of --output_dir: pass --output_dir")
        found = find_resume_checkpoint(args.output_dir)
        log.info("--resume auto: %s", f"continuing from {found}" if found else "no checkpoint yet, starting fresh")
        resume = str(found) if found else ""
    if resume:
        ckpt = load_checkpoint(resume, hint="check the path, or use --resume auto to continue from --output_dir")
        _load_model(state.model, ckpt, resume, args)
        _load_ema(state, ckpt)
        _warn_behaviour_mismatch(args, ckpt, resume)
        if args.eval:
            log.info("evaluating the weights of %s", resume)
            return 0
        start_iteration = 0
        if all(k in ckpt for k in ("optimizer", "lr_scheduler", "epoch")):
            state.start_epoch, start_iteration = state.restore(ckpt, args)
        log.info("resumed from %s (next epoch %d, iteration %d)", resume, state.start_epoch, start_iteration)
        return start_iteration
    if args.finetune:
        from run.finetune import load_for_finetuning  # usage-side helper; only fine-tuning runs need it

        # e.g. sigmoid class heads keep the fresh build's focal prior (bias -4.6) instead of reset_parameters.
        keep = FAMILIES[args.model].keep_initial_heads
        load_for_finetuning(state.model, args.finetune, keep_initial=keep)
        _load_ema(state, {})  # the EMA starts from the fine-tuning weights
    return 0


def _load_ema(state: TrainState, ckpt: dict) -> None:
    """The checkpoint's EMA ('ema'), else a fresh copy of ``state.model`` (no EMA without --ema_decay)."""
    ema = getattr(state, "ema", None)  # a bare holder of the model (tests, tools) has none
    if ema is None:
        return
    if isinstance(ckpt.get("ema"), dict):
        ema.load_state_dict(ckpt["ema"])
    else:
        ema.module.load_state_dict(state.model.state_dict())
        ema.updates = 0


# Flags whose stored value, when it differs from this run's, explains a state-dict mismatch.
ARCHITECTURE_FLAGS = (
    "model", "backbone", "backbone_stages", "dilation", "hidden_dim", "dim_feedforward", "enc_layers", "dec_layers",
    "nheads", "num_queries", "pre_norm", "masks", "position_embedding", "num_classes", "dataset_file", "aux_loss",
    "num_feature_levels", "two_stage", "with_box_refine", "dec_n_points", "enc_n_points",
)  # fmt: skip


def _load_model(model: nn.Module, ckpt: dict, source: str, args: argparse.Namespace | None = None) -> None:
    """Strict state-dict loading; a mismatch is one line: counts, first keys, and the checkpoint's differing flags."""
    weights = ckpt["model"] if "model" in ckpt else inference_weights(ckpt)  # published RT-DETR: 'ema' only
    if weights is None:
        raise CheckpointError(f"checkpoint {source} has no 'model' entry (keys: {sorted(ckpt)[:5]})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(mismatch_summary(model.state_dict(), ckpt, source, args, e)) from None


def mismatch_summary(
    model_state: dict, ckpt: dict, source: str, args: argparse.Namespace | None, error: Exception | None = None
) -> str:
    """One line on why ``ckpt['model']`` does not fit ``model_state`` (every key is never listed)."""
    state = ckpt["model"] if "model" in ckpt else inference_weights(ckpt)
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(model_state[k].shape)}"
        for k in model_state
        if k in state and hasattr(state[k], "shape") and state[k].shape != model_state[k].shape
    ]
    parts = [
        f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if not parts and error is not None:
        parts = [str(error).strip().splitlines()[-1][:200]]
    stored = _checkpoint_args(ckpt)
    differing = [
        f"--{k} {stored[k]} (this run {vars(args)[k]})"
        for k in ARCHITECTURE_FLAGS
        if args is not None and k in stored and k in vars(args) and stored[k] != vars(args)[k]
    ]
    flags = (
        f"the checkpoint was trained with {', '.join(differing)}: pass those flags (or its config.yaml with --config)"
        if differing
        else "build the model with the checkpoint's flags (backbone, backbone_stages, hidden_dim, layers, "
        "num_queries, --num_classes / --dataset_file)"
    )
    return (
        f"checkpoint {source} does not fit this model ({'; '.join(parts)}); {flags}, "
        "or use --finetune to re-initialise mismatched heads"
    )


def _checkpoint_args(ckpt: dict) -> dict[str, Any]:
    """The checkpoint's training arguments as a dict (stored as a Namespace by the published code), or {}."""
    old = ckpt.get("args")
    return vars(old) if isinstance(old, argparse.Namespace) else (old or {})


def _warn_behaviour_mismatch(args: argparse.Namespace, ckpt: dict, source: str) -> None:
    """One warning line when the checkpoint was trained with other BEHAVIOUR_FLAGS values than this run's."""
    if ckpt.get("args") is None:
        return
    old = _checkpoint_args(ckpt)
    changed = [
        (k, old.get(k, default), vars(args)[k])
        for k, default in BEHAVIOUR_FLAGS.items()
        if old.get(k, default) != vars(args)[k]
    ]
    if changed:
        diffs = ", ".join(f"{k}={was} (this run {now})" for k, was, now in changed)
        log.warning("warning: %s was trained with %s; the weights load but the outputs will differ: pass the "
                    "checkpoint's values (e.g. its --config)", source, diffs)  # fmt: skip


def _group_mismatch(saved: dict, optimizer: torch.optim.Optimizer, error: Exception) -> str:
    """One line on why the checkpoint's optimizer state does not fit the groups this run's flags built."""
    sizes = [len(g.get("params", ())) for g in saved.get("param_groups", [])]
    here = [len(g["params"]) for g in optimizer.param_groups]
    if sizes == here:
        return f"the checkpoint's optimizer state does not fit this run's optimizer ({str(error).strip()[:200]})"
    return (
        f"the checkpoint's optimizer has {len(sizes)} parameter groups of {sizes} parameters, this run's flags build "
        f"{len(here)} of {here} (groups follow --lr/--lr_backbone/--*weight_decay/--lr_backbone_names: e.g. an "
        "equal --lr and --lr_backbone merge RT-DETRv2's groups); resume with the checkpoint's values of those flags"
    )


def _scheduled_lrs(args: argparse.Namespace, base_lrs: list[float], last_epoch: int):
    """(scheduler, lrs): this run's epoch scheduler (run.recipe.build_lr_scheduler) over groups at ``base_lrs``,
    stepped to ``last_epoch`` on a stand-in optimizer; whatever its kind, the lrs follow its own rule."""
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base_lrs])
    scheduler = build_lr_scheduler(stand_in, args)
    stand_in.step()  # no gradients: changes nothing, but the scheduler expects an optimizer step before its own
    for _ in range(max(last_epoch, 0)):
        scheduler.step()
    return scheduler, [float(lr) for lr in scheduler.get_last_lr()]


def _reconcile_schedule(
    args: argparse.Namespace,
    ckpt: dict,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    built: list[tuple[float, float]],
    warmup: LinearWarmup | None = None,
) -> None:
    """A resumed optimizer/scheduler/warm-up carries the checkpoint's schedule: say so, or keep the new one.

    Args:
        built: (base lr, weight decay) of every param group as this run's flags built them (``build_optimizer``,
            any family's grouping) before the checkpoint's state was loaded: the new schedule's base values.
        warmup: this run's warm-up (restored from the checkpoint), re-based on the new lrs.

    With ``--keep_new_schedule`` every group continues at its new base lr and weight decay, at the scheduler's
    position (epochs it has stepped) and the warm-up's (steps done), with the new lr drops and warm-up length.
    """
    old = _checkpoint_args(ckpt)
    changed = [k for k in SCHEDULE_FLAGS if k in old and k in vars(args) and old[k] != vars(args)[k]]
    if not changed:
        return
    if not args.keep_new_schedule:
        diffs = ", ".join(f"{k}={old[k]} (command line {vars(args)[k]})" for k in changed)
        log.warning("warning: resume keeps the checkpoint's %s; pass --keep_new_schedule to use the new values", diffs)
        return
    base_lrs = [lr for lr, _ in built]
    fresh, lrs = _scheduled_lrs(args, base_lrs, lr_scheduler.last_epoch)
    lr_scheduler.load_state_dict(fresh.state_dict())  # new drops (StepLR / MultiStepLR) and base lrs, same position
    for group, (base_lr, weight_decay), lr in zip(optimizer.param_groups, built, lrs):
        group["initial_lr"], group["lr"], group["weight_decay"] = base_lr, lr, weight_decay
    if warmup is not None:  # still warming up: base x its factor at the steps done (new length); else untouched
        warmup.load_state_dict({"warmup_iters": args.warmup_iters, "step_count": warmup.step_count,
                                "base_lrs": base_lrs})  # fmt: skip
    log.info("--keep_new_schedule: using %s from the command line", ", ".join(changed))
