"""Training and evaluation of every detector family (`python main.py --model NAME --help`).

The command line is the published one of each family; flags after "new in this project" are additions. The
parsed flags are complete when ``parse_args`` returns (config file, family defaults, a resumed checkpoint's
family) and are never written to afterwards: what the run learns lives in a ``run.context.RunContext``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cli.arguments import check_family_flags, get_args_parser
from cli.config import (
    UsageError,
    apply_config,
    command_line_dests,
    dump_config,
    explicit_dests,
    explicit_of,
    is_explicit,
    parse_args_with_config,
)
from run import distributed as run_distributed
from run.checkpoint import CheckpointError, save_checkpoint
from run.context import RunContext
from run.ema import build_ema
from run.family import adopt_checkpoint_family
from run.loaders import begin_epoch, build_data_loaders
from run.lr_warmup import LinearWarmup, step_epoch_scheduler
from run.preemption import PreemptionHandler, requeue_slurm_job
from run.recipe import apply_family_data, build_lr_scheduler, build_optimizer, class_numbering
from run.rng_state import preserved_rng_state
from run.run_dir import check_new_run_dir, next_free_run_dir, resume_command
from run.run_state import TrainState, checkpoint_paths, load_weights
from util import distributed as dist_utils
from util.acceleration import apply_channels_last, compile_model
from util.amp import make_grad_scaler
from util.logging import MetricTracker, RunLogger, setup_console
from util.threads import busy_hint, choose_threads

# models, datasets and engine are imported inside main(): get_args_parser() stays cheap and importable alone.
log = logging.getLogger("detr")
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


# ------------------------------------------------------------------------------------------------ building


def warn_dilated_eval_batch(args: argparse.Namespace) -> None:
    """One warning when a dilated model is evaluated with batches > 1 (padding changes its AP: published pitfall)."""
    eval_batch_size = args.eval_batch_size or args.batch_size
    if args.dilation and eval_batch_size > 1:
        log.warning(
            "warning: evaluating a dilated (DC5) model with batch size %d: padding lowers its AP; "
            "use --eval_batch_size 1 for exact numbers",
            eval_batch_size,
        )


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------ outputs


def _write_eval_outputs(output_dir: Path | None, coco_evaluator, epoch: int | None) -> None:
    """Published eval files: eval.pth (--eval) or eval/latest.pth and eval/NNN.pth every 50 epochs."""
    if output_dir is None or coco_evaluator is None or "bbox" not in coco_evaluator.coco_eval:
        return
    names = [output_dir / "eval.pth"] if epoch is None else [output_dir / "eval" / "latest.pth"]
    if epoch is not None and epoch % 50 == 0:
        names.append(output_dir / "eval" / f"{epoch:03}.pth")
    for name in names:
        name.parent.mkdir(parents=True, exist_ok=True)
        torch.save(coco_evaluator.coco_eval["bbox"].eval, name)


def _report_predictions(output_dir: Path | None, coco_evaluator) -> None:
    """--eval: COCO results JSON per iou type and the per-category AP table."""
    from datasets.coco_eval import format_per_category_table, per_category_ap

    if coco_evaluator is None:
        return
    for iou_type, coco_eval in coco_evaluator.coco_eval.items():
        table = format_per_category_table(per_category_ap(coco_eval))
        log.info("per-category AP (%s, IoU 0.50:0.95):\n%s", iou_type, table)
        if output_dir is not None:
            (output_dir / "eval").mkdir(parents=True, exist_ok=True)
            path = coco_evaluator.dump_results(output_dir / "eval" / f"predictions_{iou_type}.json", iou_type)
            (output_dir / "eval" / f"per_category_{iou_type}.txt").write_text(table + "\n", encoding="utf-8")
            log.info("predictions (COCO results format): %s", path)


def _metric_scalars(stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    """TensorBoard scalars of an evaluation by prefix: test/bbox_*, test/segm_* (12 COCO numbers each), and
    test/PQ_all_*, test/PQ_th_*, test/PQ_st_* (pq, sq, rq)."""
    from datasets.coco_eval import STAT_NAMES

    scalars = {}
    for key, prefix in (("coco_eval_bbox", "test/bbox_"), ("coco_eval_masks", "test/segm_")):
        if key in stats:
            scalars[prefix] = dict(zip(STAT_NAMES, stats[key]))
    for key in ("PQ_all", "PQ_th", "PQ_st"):
        if isinstance(stats.get(key), dict):
            scalars[f"test/{key}_"] = {k: float(stats[key][k]) for k in ("pq", "sq", "rq") if k in stats[key]}
    return scalars


def _metrics_line(stats: dict[str, Any]) -> str:
    """'bbox AP 0.412, segm AP 0.310, PQ 43.4 (SQ 79.3, RQ 53.8; things 48.2, stuff 36.3)' for what was measured."""
    parts = [f"{name} AP {stats[key][0]:.3f}" for key, name in (("coco_eval_bbox", "bbox"), ("coco_eval_masks", "segm"))
             if key in stats]  # fmt: skip
    if isinstance(stats.get("PQ_all"), dict):
        pq = {k: 100 * float(stats[k]["pq"]) if isinstance(stats.get(k), dict) else float("nan")
              for k in ("PQ_all", "PQ_th", "PQ_st")}  # fmt: skip
        everything = stats["PQ_all"]
        parts.append(f"PQ {pq['PQ_all']:.1f} (SQ {100 * everything['sq']:.1f}, RQ {100 * everything['rq']:.1f}; "
                     f"things {pq['PQ_th']:.1f}, stuff {pq['PQ_st']:.1f})")  # fmt: skip
    return ", ".join(parts)


def _eval_scope(stats: dict[str, Any], prefix: str = "") -> str:
    """'the validation set', or '40 of 200 validation images' after an evaluation --max_iters_per_epoch cut short."""
    done, total = stats.get(f"{prefix}eval_images"), stats.get(f"{prefix}eval_images_total")
    if done is None or total is None or done >= total:
        return "the validation set"
    return f"{done} of {total} validation images (--max_iters_per_epoch caps evaluation too)"


def _summary(stats: dict[str, Any]) -> str:
    names = {"train_loss": "loss", "train_lr": "lr", "test_loss": "val loss"}
    parts = [f"{name} {stats[key]:.4g}" for key, name in names.items() if key in stats]
    metrics = _metrics_line({k[len("test_") :]: v for k, v in stats.items() if k.startswith("test_")})
    if metrics and _eval_scope(stats, "test_") != "the validation set":
        metrics += f" on {stats['test_eval_images']} of {stats['test_eval_images_total']} validation images"
    return ", ".join(parts + ([metrics] if metrics else []))


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line with ``--config`` applied (defaults < YAML < explicit flags).

    A data path given on the command line beats a YAML ``dataset_file: synthetic`` (the demo config's): the
    run trains on the data the user named, never silently on the generated set.
    """
    from datasets.coco import DATA_PATH_FLAGS

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parse_args_with_config(parser, argv)
    command_line = explicit_dests(parser, argv)
    paths = [f"--{flag}" for flag in DATA_PATH_FLAGS if flag in command_line]
    if args.dataset_file == "synthetic" and paths and "dataset_file" not in command_line:
        log.warning("warning: %s on the command line overrides dataset_file: synthetic of %s; using --dataset_file "
                    "coco", " ".join(paths), args.config)  # fmt: skip
        args.dataset_file = "coco"
    return finish_parsing(args)


def finish_parsing(args: argparse.Namespace) -> argparse.Namespace:
    """The last steps of parsing: a ``--resume`` without ``--model`` takes the checkpoint's family, then flags only
    other families read are refused (after the YAML, the family defaults and that family are final).

    Raises:
        UsageError: a flag the family does not read (one line naming it and the family that does).
    """
    adopt_checkpoint_family(args)
    try:
        check_family_flags(args, command_line_dests(args), explicit_of(args))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Train and/or evaluate the detector ``args`` describes; returns the last evaluation's stats.

    Args:
        args: ``parse_args(argv)``; a Namespace built in Python (``get_args_parser().parse_args([...])``) is
            completed here on a copy (its ``--config``, a resumed checkpoint's family), never changed.
        argv: the command line, for the exact command that resumes the run after a preemption.

    Raises:
        SystemExit: training stopped on a non-finite loss (no checkpoint written for that epoch).
    """
    from engine import NonFiniteLossError

    start_time = time.time()
    if not explicit_of(args):  # not from parse_args: finish parsing a copy
        args = finish_parsing(apply_config(argparse.Namespace(**vars(args)), get_args_parser()))
    rank, _, local_rank = run_distributed.launcher_ranks()
    setup_console(rank == 0)
    device = run_distributed.select_device(args.device, is_explicit(args, "device"), local_rank)
    try:
        threads, why = choose_threads(args.threads, device.type, args.num_workers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    log.info("device %s, %d intra-op CPU thread%s (%s)%s", device, threads, "s" if threads > 1 else "", why,
             busy_hint(threads) if device.type == "cpu" and why != "--threads" else "")  # fmt: skip
    ctx = RunContext(device, run_distributed.init_distributed_mode(device, args.dist_url, args.dist_timeout), argv,
                     start_time)  # fmt: skip
    try:
        return _run(args, ctx)
    except NonFiniteLossError as e:
        raise SystemExit(f"error: training stopped: {e}; the last saved checkpoint is left as it was") from None
    except RuntimeError as e:  # a collective failed (dead/hung rank, after --dist_timeout): name the rank
        failure = run_distributed.peer_failure(e)
        if failure is None:
            raise
        run_distributed.exit_after_peer_failure(failure)
    finally:
        run_distributed.cleanup()
        torch.set_num_threads(threads_before)  # main() called from Python leaves the caller's setting


def _run(args: argparse.Namespace, ctx: RunContext) -> dict[str, Any]:
    import datasets
    import models
    from engine import evaluate

    device = ctx.device
    if args.frozen_weights is not None and not args.masks:
        raise UsageError("--frozen_weights is for the segmentation stage only: add --masks")
    if args.resume == "auto" and not args.output_dir:
        raise UsageError("--resume auto continues from the checkpoints of --output_dir: pass --output_dir")
    is_main = dist_utils.is_main_process()
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and not args.eval and not args.resume:
        check_new_run_dir(output_dir)  # before any collective: every process checks the same files
    if output_dir is not None and is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(args.seed + dist_utils.get_rank())

    data = datasets.data_settings(args)
    family = models.FAMILIES[args.model]
    family_settings = family.make_settings(vars(args))
    category_ids, ctx.num_classes = class_numbering(family, family_settings, data, args.num_classes)
    data = dataclasses.replace(data, num_classes=ctx.num_classes, remap_categories=category_ids is not None)
    record = ctx.record(args)  # the flags as resolved here: written to checkpoints and config files
    build_flags = record
    if args.resume and args.resume != "auto" and args.backbone_weights == "imagenet":
        # The checkpoint overwrites the backbone: no download (offline runs work).
        build_flags = argparse.Namespace(**{**vars(record), "backbone_weights": "none"})
    try:
        model, criterion, postprocessors = models.build_model(build_flags, ctx.num_classes)
    except ValueError as e:  # flags that do not fit together, e.g. --masks with --backbone_stages 2
        raise UsageError(str(e)) from None
    if category_ids is not None:
        postprocessors["bbox"].set_category_ids(category_ids, ctx.num_classes)
    if ctx.dist.distributed and args.sync_bn and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    if args.channels_last:
        apply_channels_last(model_without_ddp)
    if args.compile:  # in place: state-dict keys are unchanged; padded sizes (size_divisibility) give static shapes
        compile_model(model_without_ddp, dynamic=None if args.size_divisibility == 1 else False)
    if ctx.dist.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    log.info("number of params: %d", n_parameters)

    optimizer = build_optimizer(model_without_ddp, args)
    try:
        scaler = make_grad_scaler(args.amp, device.type)
    except ValueError as e:  # e.g. --amp fp16 on a CPU
        raise UsageError(str(e)) from None
    lr_scheduler = build_lr_scheduler(optimizer, args)  # before the warm-up, which lowers the groups' lr
    state = TrainState(
        model_without_ddp, optimizer, lr_scheduler, scaler, start_epoch=args.start_epoch,
        ema=build_ema(model_without_ddp, args.ema_decay, args.ema_warmups),
        warmup=LinearWarmup(optimizer, args.warmup_iters) if args.warmup_iters > 0 else None,
    )  # fmt: skip
    dataset_val = datasets.build_dataset("val", data)
    dataset_train = None if args.eval else datasets.build_dataset("train", data)
    train_collate = apply_family_data(family, family_settings, category_ids, dataset_val, dataset_train)
    loader_train, loader_val = build_data_loaders(args, dataset_train, dataset_val, device, ctx.dist.distributed,
                                                  train_collate)  # fmt: skip
    base_ds = datasets.get_coco_api_from_dataset(dataset_val)  # panoptic: its instance annotations (box AP)
    if base_ds is not None and base_ds.dataset.get("categories"):
        state.class_names = {int(c["id"]): str(c["name"]) for c in base_ds.dataset["categories"] if "name" in c}
    if "panoptic" in postprocessors and hasattr(dataset_val, "is_thing_map"):
        # The published COCO rule (ids <= 90 are things) is wrong for other panoptic data; the dataset knows.
        postprocessors["panoptic"].is_thing_map = dataset_val.is_thing_map
    warn_dilated_eval_batch(args)

    start_iteration = load_weights(args, state)
    if output_dir is not None and is_main:  # the run's configuration: a resume's position is not part of it
        # An evaluation never rewrites the training run's config.yaml (--config run/config.yaml would only evaluate).
        name = "eval_config.yaml" if args.eval else "config.yaml"
        dump_config(record, get_args_parser(), output_dir / name, exclude=("resume", "start_epoch"))
    eval_kwargs = dict(
        progress=not args.no_progress, max_iters=args.max_iters_per_epoch, amp=args.amp, eval_backend=args.eval_backend
    )
    eval_model = model if state.ema is None else state.ema.module  # the EMA weights are the ones evaluated
    evaluate_now = functools.partial(
        evaluate, eval_model, criterion, postprocessors, loader_val, base_ds, device, args.output_dir, **eval_kwargs
    )
    if not args.eval:
        return _train(args, ctx, record, model, criterion, state, loader_train, evaluate_now, n_parameters,
                      start_iteration)  # fmt: skip
    test_stats, coco_evaluator = evaluate_now()
    if is_main:
        metrics = _metrics_line(test_stats)
        log.info("%s", f"{metrics} on {_eval_scope(test_stats)}" if metrics else "no metrics (no annotations to "
                 "compare with)")  # fmt: skip
        _write_eval_outputs(output_dir, coco_evaluator, None)
        _report_predictions(output_dir, coco_evaluator)
        if output_dir is not None:
            stats = {f"test_{k}": v for k, v in test_stats.items()}
            (output_dir / "eval" / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return test_stats


def _train(args, ctx: RunContext, record: argparse.Namespace, model, criterion, state: TrainState, loader_train,
           evaluate_now, n_parameters: int, start_iteration: int) -> dict[str, Any]:  # fmt: skip
    """The epoch loop: train, checkpoint, evaluate, log; ``record`` is what checkpoints store as the run's flags."""
    device = ctx.device
    from datasets import skipped_samples
    from engine import lead_lr_group, train_one_epoch

    is_main = dist_utils.is_main_process()
    output_dir = Path(args.output_dir) if args.output_dir else None
    logger = RunLogger(output_dir, enabled=is_main)
    n_iters = min(len(loader_train), args.max_iters_per_epoch or len(loader_train))

    def save(ckpt: dict, paths: list[Path]) -> None:
        if output_dir is not None and is_main:
            for path in paths:
                save_checkpoint(ckpt, path)

    log.info("start training: epochs %d..%d, %d iterations each", state.start_epoch, args.epochs - 1, n_iters)
    lr_group = lead_lr_group(state.optimizer, args.lr)  # the logged 'lr' (RT-DETRv2's group 0 is the backbone)
    test_stats: dict[str, Any] = {}
    preemption = PreemptionHandler().install()
    try:
        for epoch in range(state.start_epoch, args.epochs):
            epoch_start = time.time()
            skip = start_iteration if epoch == state.start_epoch else 0
            begin_epoch(loader_train, epoch, args.seed, skip)
            tracker = state.epoch_tracker(resuming=skip > 0)
            skipped_before = skipped_samples(loader_train.dataset)

            def on_step(done: int, epoch: int = epoch, tracker: MetricTracker = tracker) -> bool:
                """After each step: EMA and warm-up; stop on a preemption signal; mid-epoch checkpoints."""
                if state.ema is not None:
                    state.ema.update(model)
                if state.warmup is not None:
                    state.warmup.step()
                stop = preemption.requested_on_any_rank(device)
                periodic = args.checkpoint_every > 0 and done % args.checkpoint_every == 0 and done < n_iters
                if (stop or periodic) and output_dir is not None:
                    ckpt = state.checkpoint(record, epoch - 1, iteration=done, metrics=tracker)
                    save(ckpt, [output_dir / "checkpoint.pth"])
                return stop

            train_stats = train_one_epoch(
                model, criterion, loader_train, state.optimizer, device, epoch, args.clip_max_norm,
                logger=logger, max_iters=args.max_iters_per_epoch, progress=not args.no_progress, amp=args.amp,
                scaler=state.scaler, skip_nonfinite=args.skip_nonfinite, start_iteration=skip, on_step=on_step,
                tracker=tracker, lr_group=lr_group,
            )  # fmt: skip
            if preemption.requested:
                how = resume_command(ctx.argv, "python main.py") if output_dir else None
                log.info("stopped by %s during epoch %d; %s", preemption.signal_name, epoch,
                         f"continue with: {how}" if how else "nothing was saved (no --output_dir)")  # fmt: skip
                if not preemption.forward_to_previous():  # submitit's own handler requeues when there is one
                    requeue_slurm_job()
                return test_stats
            step_epoch_scheduler(state.lr_scheduler, state.warmup)  # not while the warm-up runs (published)
            if output_dir is not None:
                save(state.checkpoint(record, epoch), checkpoint_paths(output_dir, epoch, args.lr_drop))

            log_stats: dict[str, Any] = {f"train_{k}": v for k, v in train_stats.items()}
            skipped = skipped_samples(loader_train.dataset) - skipped_before
            if skipped:  # the per-sample warnings appear once; the count every epoch
                log.warning("warning: epoch %d skipped %d unreadable training samples (--skip_bad_images)", epoch,
                            skipped)  # fmt: skip
                log_stats["train_skipped_samples"] = skipped
            if (epoch + 1) % max(args.eval_every, 1) == 0 or epoch == args.epochs - 1:
                with preserved_rng_state():  # the checkpoint above holds the RNG state the next epoch starts from
                    test_stats, coco_evaluator = evaluate_now()
                log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
                for prefix, values in _metric_scalars(test_stats).items():
                    logger.scalars(values, step=epoch, prefix=prefix)
                if is_main:
                    _write_eval_outputs(output_dir, coco_evaluator, epoch)
            now = time.time()
            log_stats.update(epoch=epoch, n_parameters=n_parameters, epoch_time=now - epoch_start)
            log_stats.update(elapsed_time=now - ctx.start_time)
            logger.log_epoch(log_stats)
            log.info("epoch %d: %s (%.1f s)", epoch, _summary(log_stats), log_stats["epoch_time"])
    finally:
        preemption.restore()
        logger.close()

    log.info("total time %.1f s", time.time() - ctx.start_time)
    if "coco_eval_bbox" in test_stats:
        log.info("final COCO AP (IoU 0.50:0.95) on %s: %.3f", _eval_scope(test_stats), test_stats["coco_eval_bbox"][0])
    if "coco_eval_masks" in test_stats or "PQ_all" in test_stats:
        log.info("final validation metrics on %s: %s", _eval_scope(test_stats), _metrics_line(test_stats))
    if output_dir is not None:
        log.info("log: %s", logger.log_path)
        log.info("checkpoint: %s", output_dir / "checkpoint.pth")
        log.info("TensorBoard: tensorboard --logdir %s", logger.tensorboard_dir)
    return test_stats


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: no arguments run the demo; user errors become one clear line instead of a traceback."""
    from datasets.errors import DatasetError
    from models.backbone import WeightsUnavailableError
    from run.finetune import FinetuneError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # the published CLI always has arguments
        argv = ["--config", str(DEMO_CONFIG)]
        default_dir = Path(parse_args(argv).output_dir)
        demo_dir = next_free_run_dir(default_dir)  # a second demo gets its own folder (runs/demo_2, ...)
        if demo_dir != default_dir:
            argv += ["--output_dir", str(demo_dir)]
        print(f"no arguments: running the demo ({DEMO_CONFIG}) into {demo_dir}; see --help for COCO training",
              flush=True)  # fmt: skip
    errors = (
        UsageError,
        CheckpointError,
        DatasetError,
        run_distributed.DeviceError,
        WeightsUnavailableError,
        FinetuneError,
    )
    try:
        main(parse_args(argv), argv)
    except errors as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
