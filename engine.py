"""One training epoch and one evaluation pass (the loops; no file I/O except through the logger passed in)."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from datasets.coco_eval import CocoEvaluator
from util import distributed as dist_utils
from util.amp import autocast_context, optimizer_step
from util.logging import MetricTracker, RunLogger

log = logging.getLogger("detr")


# Seconds between the progress lines of a run without progress bars (--no_progress); also one at each pass's end.
PROGRESS_LOG_SECONDS = 60.0


class _Heartbeat:
    """Progress for logs (no tqdm bar): one line every ``PROGRESS_LOG_SECONDS`` and one at the end of a pass."""

    def __init__(self, what: str, total: int, enabled: bool, start: int = 0) -> None:
        self.what, self.total, self.enabled, self.start = what, total, enabled, start
        self.started = self.last = time.perf_counter()

    def step(self, done: int, **values: str) -> None:
        """After ``done`` of ``total`` iterations; ``values`` (e.g. loss) are shown as given."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < PROGRESS_LOG_SECONDS:
            return
        self.last = now
        per_iter = (now - self.started) / max(done - self.start, 1)
        shown = "".join(f", {name} {value}" for name, value in values.items())
        log.info("%s: %d/%d iterations%s, %.3g s/it, ETA %.0f s", self.what, done, self.total, shown, per_iter,
                 per_iter * (self.total - done))  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or predictions); the caller stops without saving this epoch."""


def _to_float32(outputs: Any) -> Any:
    """Cast floating tensors of a nested output structure to float32 (losses are computed in float32)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, Mapping):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs


def _targets_to(targets: Iterable[dict], device: torch.device) -> list[dict]:
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]


# Prediction keys the matcher reads (a NaN there fails the matching before any loss is computed).
_MATCHED_KEYS = ("pred_logits", "pred_boxes")


def _matched_predictions(outputs: Any, where: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every matched prediction: final, auxiliary, encoder/denoising outputs."""
    found: list[tuple[str, torch.Tensor]] = []
    if isinstance(outputs, Mapping):
        for key, value in outputs.items():
            name = f"{where}.{key}" if where else str(key)
            if key in _MATCHED_KEYS and isinstance(value, torch.Tensor) and value.is_floating_point():
                found.append((name, value))
            elif isinstance(value, (Mapping, list, tuple)):
                found += _matched_predictions(value, name)
    elif isinstance(outputs, (list, tuple)):
        for index, value in enumerate(outputs):
            found += _matched_predictions(value, f"{where}[{index}]")
    return found


def _nonfinite_predictions(outputs: Any, device: torch.device) -> list[str] | None:
    """None when every matched prediction is finite on every process; else the names of this process's
    non-finite ones (empty when only another process diverged). One host sync, one collective."""
    matched = _matched_predictions(outputs)
    if not matched:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in matched]).all()
    if dist_utils.all_reduce_sum((~finite).float().to(device)).item() == 0:
        return None
    return [name for name, t in matched if not bool(torch.isfinite(t).all())]


def _loss_terms(loss_dict: Mapping[str, torch.Tensor], weight_dict: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Published logging names: weighted terms under their own name, every raw term as ``<name>_unscaled``."""
    terms = {k: v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict}
    terms.update({f"{k}_unscaled": v for k, v in loss_dict.items()})
    return terms


def lead_lr_group(optimizer: torch.optim.Optimizer, lr: float | None = None) -> int:
    """Index of the param group whose lr a run reports as its 'lr' (the one following ``--lr``).

    The first group whose base lr (``initial_lr``, which an lr scheduler records before any warm-up or decay;
    else ``lr``) equals ``lr``; without a match (or ``lr`` None) the first group of the largest base lr. The
    position is not fixed by family: DETR puts the ``--lr`` group first, RT-DETRv2's role groups the backbone.
    """
    bases = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    if not bases:
        raise ValueError("the optimizer has no param groups")
    if lr is not None:
        for index, base in enumerate(bases):
            if math.isclose(base, lr, rel_tol=1e-9, abs_tol=0.0):
                return index
    return bases.index(max(bases))


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    max_norm: float = 0,
    *,
    logger: RunLogger | None = None,
    max_iters: int | None = None,
    progress: bool = True,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    skip_nonfinite: int = 0,
    start_iteration: int = 0,
    on_step: Callable[[int], bool] | None = None,
    tracker: MetricTracker | None = None,
    lr_group: int | None = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader`` (at most ``max_iters`` batches).

    Args:
        max_norm: gradient clipping max norm (0 disables clipping; the norm is still logged).
        logger: receives TensorBoard scalars per iteration under ``train/``.
        progress: tqdm bar (loss, lr, ETA) on the main process; without it a log line every
            ``PROGRESS_LOG_SECONDS`` and at the end of the epoch.
        amp: mixed precision of the forward pass; ``scaler`` (a GradScaler) is needed for 'fp16'.
        skip_nonfinite: batches with a non-finite loss that may be skipped before stopping.
        start_iteration: batches of this epoch trained before a mid-epoch resume; ``data_loader`` already
            starts after them (it yields the remaining ones), this only offsets the counters.
        on_step: called after every optimizer step with the number of batches of the epoch done; returning
            True ends the epoch there (e.g. on a preemption signal).
        tracker: accumulates the epoch's statistics (pass the one restored from a mid-epoch checkpoint so the
            epoch means cover the batches trained before the resume too); a fresh one when None.
        lr_group: the param group whose lr is logged as 'lr' (tqdm, epoch means); None: ``lead_lr_group``
            (largest base lr). Every group's lr also goes to TensorBoard as ``lr/group{i}``.

    Returns:
        Epoch means over all processes: 'loss', weighted loss terms, '<term>_unscaled', 'class_error',
        'lr', 'grad_norm' (the published log names); 'amp_overflow_steps' (a count) after fp16 overflows.

    Raises:
        NonFiniteLossError: the loss or the matched predictions became NaN/inf (naming the offending terms);
            ``skip_nonfinite`` skips such batches instead, on every process together.
    """
    model.train()
    criterion.train()
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=False)
    tracker = MetricTracker() if tracker is None else tracker
    n_iters = len(data_loader) if max_iters is None else min(len(data_loader), max_iters)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lr_group = lead_lr_group(optimizer) if lr_group is None else lr_group
    if not 0 <= lr_group < len(optimizer.param_groups):
        raise ValueError(f"lr_group {lr_group} is not one of the optimizer's {len(optimizer.param_groups)} groups")
    bar = tqdm(
        total=n_iters,
        initial=start_iteration,
        desc=f"Epoch {epoch}",
        disable=not (progress and dist_utils.is_main_process()),
        dynamic_ncols=True,
        leave=False,
    )
    heartbeat = _Heartbeat(f"epoch {epoch}", n_iters, not progress and dist_utils.is_main_process(), start_iteration)
    skipped = 0
    needs_targets = getattr(getattr(model, "module", model), "needs_targets", False)  # through a DDP wrapper
    tic = time.perf_counter()
    batches = itertools.islice(data_loader, max(n_iters - start_iteration, 0))
    for i, (samples, targets) in enumerate(batches, start=start_iteration):
        data_time = time.perf_counter() - tic
        samples = samples.to(device, non_blocking=True)
        targets = _targets_to(targets, device)
        with autocast_context(device.type, amp):
            # DINO builds its denoising queries from the targets (published: model(samples, targets)).
            outputs = model(samples, targets) if needs_targets else model(samples)
        outputs = _to_float32(outputs)
        # Diverged predictions would fail inside the matcher: check them first, on every process together.
        nonfinite = _nonfinite_predictions(outputs, device)
        message = None
        if nonfinite is not None:
            what = ", ".join(nonfinite[:3]) or "on another process"
            message = f"non-finite predictions at epoch {epoch}, iteration {i} ({what}): the model diverged"
        else:
            loss_dict = criterion(outputs, targets)
            weight_dict = criterion.weight_dict
            losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

            # Reduced values are identical on every process, so all of them stop (or skip) together.
            reduced = dist_utils.reduce_dict(loss_dict)
            terms = _loss_terms(reduced, weight_dict)
            loss_value = sum(v for k, v in terms.items() if k in weight_dict).item()
            if not math.isfinite(loss_value):
                bad = ", ".join(f"{k}={v.item()}" for k, v in reduced.items() if not math.isfinite(v.item()))
                message = f"non-finite loss {loss_value} at epoch {epoch}, iteration {i} ({bad or 'weighted sum'})"
        if message is not None:
            optimizer.zero_grad(set_to_none=True)
            if skipped < skip_nonfinite:
                skipped += 1
                log.warning(
                    "warning: %s; skipping this batch (%d of --skip_nonfinite %d)", message, skipped, skip_nonfinite
                )
                tic = time.perf_counter()
                continue
            bar.close()
            raise NonFiniteLossError(message)

        grad_norm = optimizer_step(losses, optimizer, scaler, max_norm, params).item()

        lr = optimizer.param_groups[lr_group]["lr"]
        iter_time = time.perf_counter() - tic
        batch = len(targets)
        tracker.update(n=batch, loss=loss_value, **terms)
        tracker.update(lr=lr, iter_time=iter_time, data_time=data_time)
        if math.isfinite(grad_norm):
            tracker.update(grad_norm=grad_norm)
        else:  # an fp16 overflow: the scaler skipped this step and lowers its scale; counted, not fatal
            tracker.add("amp_overflow_steps")
        if "class_error" in reduced:
            tracker.update(n=batch, class_error=reduced["class_error"])
        if logger is not None:
            scalars = {"loss": loss_value, **{k: v for k, v in terms.items() if k in weight_dict}}
            scalars.update(lr=lr, grad_norm=grad_norm, iter_time=iter_time, data_time=data_time)
            logger.scalars(scalars, step=epoch * n_iters + i, prefix="train/")
            group_lrs = {f"group{g}": group["lr"] for g, group in enumerate(optimizer.param_groups)}
            logger.scalars(group_lrs, step=epoch * n_iters + i, prefix="lr/")
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update()
        heartbeat.step(i + 1, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if on_step is not None and on_step(i + 1):
            break
        tic = time.perf_counter()
    bar.close()
    tracker.synchronize()
    return tracker.means()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: nn.Module | None,
    postprocessors: Mapping[str, nn.Module],
    data_loader: Iterable,
    base_ds: Any,
    device: torch.device,
    output_dir: str,
    *,
    progress: bool = True,
    max_iters: int | None = None,
    amp: str = "off",
    eval_backend: str = "pycocotools",
    verbose: bool = True,
) -> tuple[dict[str, Any], CocoEvaluator | None]:
    """Evaluate on ``data_loader``: losses, and COCO metrics against ``base_ds`` (a pycocotools COCO).

    Predictions are post-processed to each image's ORIGINAL size ('orig_size' target, (h, w)).

    Returns:
        (stats, coco_evaluator): stats holds loss means, 'coco_eval_bbox' (the 12 COCO numbers),
        'coco_eval_masks' with 'segm', and 'PQ_all'/'PQ_th'/'PQ_st' with a panoptic post-processor;
        'eval_images' (images evaluated, all processes) and 'eval_images_total' (the dataset's): they differ
        when ``max_iters`` cut the pass short, and every metric is then on that subset.
    """
    model.eval()
    if criterion is not None:
        criterion.eval()
    tracker = MetricTracker()
    iou_types = tuple(k for k in ("segm", "bbox") if k in postprocessors)
    coco_evaluator = None
    if base_ds is not None and iou_types:
        coco_evaluator = CocoEvaluator(base_ds, iou_types, backend=eval_backend)
    panoptic_evaluator = None
    if "panoptic" in postprocessors:
        from datasets.panoptic_eval import PanopticEvaluator  # only panoptic runs need it

        panoptic_evaluator = PanopticEvaluator(
            data_loader.dataset.ann_file,
            data_loader.dataset.ann_folder,
            output_dir=os.path.join(output_dir, "panoptic_eval") if output_dir else None,
        )

    n_iters = len(data_loader) if max_iters is None else min(len(data_loader), max_iters)
    show = progress and dist_utils.is_main_process()
    heartbeat = _Heartbeat("evaluation", n_iters, enabled=not progress and dist_utils.is_main_process())
    batches = itertools.islice(data_loader, n_iters)
    for i, (samples, targets) in enumerate(tqdm(batches, total=n_iters, desc="Test", disable=not show, leave=False)):
        tracker.add("eval_images", len(targets))
        samples = samples.to(device, non_blocking=True)
        targets = _targets_to(targets, device)
        with autocast_context(device.type, amp):
            outputs = model(samples)
        outputs = _to_float32(outputs)
        if criterion is not None:
            reduced = dist_utils.reduce_dict(criterion(outputs, targets))
            terms = _loss_terms(reduced, criterion.weight_dict)
            loss = sum(v for k, v in terms.items() if k in criterion.weight_dict)
            tracker.update(n=len(targets), loss=loss, **terms)
            if "class_error" in reduced:
                tracker.update(n=len(targets), class_error=reduced["class_error"])

        orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_sizes)
        if "segm" in postprocessors:
            sizes = torch.stack([t["size"] for t in targets], dim=0)
            results = postprocessors["segm"](results, outputs, orig_sizes, sizes)
        if coco_evaluator is not None:
            coco_evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, results)})
        if panoptic_evaluator is not None:
            sizes = torch.stack([t["size"] for t in targets], dim=0)
            panoptic = postprocessors["panoptic"](outputs, sizes, orig_sizes)
            for t, p in zip(targets, panoptic):
                image_id = int(t["image_id"].item())
                p["image_id"] = image_id
                p["file_name"] = f"{image_id:012d}.png"
            panoptic_evaluator.update(panoptic)
        heartbeat.step(i + 1)

    tracker.synchronize()
    stats: dict[str, Any] = tracker.means()
    total = len(data_loader.dataset) if hasattr(data_loader, "dataset") else None
    # A DistributedSampler pads the last batches with repeated images: never count more than the dataset holds.
    evaluated = int(stats.pop("eval_images", 0))
    stats["eval_images"] = evaluated if total is None else min(evaluated, total)
    stats["eval_images_total"] = total if total is not None else evaluated
    if coco_evaluator is not None:
        coco_evaluator.synchronize_between_processes()
        coco_evaluator.accumulate()
        coco_evaluator.summarize(verbose=verbose and dist_utils.is_main_process())
        if "bbox" in iou_types:
            stats["coco_eval_bbox"] = coco_evaluator.stats("bbox")
        if "segm" in iou_types:
            stats["coco_eval_masks"] = coco_evaluator.stats("segm")
    if panoptic_evaluator is not None:
        panoptic_evaluator.synchronize_between_processes()
        pq = panoptic_evaluator.summarize()
        if pq is not None:
            stats["PQ_all"], stats["PQ_th"], stats["PQ_st"] = pq["All"], pq["Things"], pq["Stuff"]
    return stats, coco_evaluator
