"""End to end through main(): train on generated data, checkpoint, log, resume-evaluate, NaN stop, torchrun."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAMILY_FLAGS, TINY_FLAGS, parse_tiny_args

import main as main_module
import models
from cli.config import UsageError
from run.checkpoint import CheckpointError, load_checkpoint
from run.preemption import PreemptionHandler
from util.logging import read_log

ROOT = Path(__file__).resolve().parents[1]
DATA_FLAGS = ["--synthetic_train_size", "4", "--synthetic_val_size", "2", "--input_scale", "0.1"]
RUN_FLAGS = [*DATA_FLAGS, "--batch_size", "2", "--lr", "1e-3", "--lr_backbone", "0", "--no_progress"]
FAMILIES = list(FAMILY_FLAGS)  # every framework feature is tested on each family, with its run flags
# Detections per validation image: DETR one per query, Deformable DETR the top 100 (query, class) pairs, DINO the
# top --num_select (20 in FAMILY_FLAGS).
DETECTIONS_PER_IMAGE = {"detr": 10, "deformable_detr": 100, "dino": 20, "rtdetrv2": 20}
# The classification loss of each family (RT-DETRv2: the varifocal loss) and its class head.
CLASS_LOSS = {"detr": "loss_ce", "deformable_detr": "loss_ce", "dino": "loss_ce", "rtdetrv2": "loss_vfl"}
CLASS_HEAD = {"detr": "class_embed.weight", "deformable_detr": "class_embed.1.weight",
              "dino": "class_embed.1.weight", "rtdetrv2": "decoder.dec_score_head.1.weight"}  # fmt: skip


def _args(data_dir: Path, out_dir: Path, *extra: str):
    args = parse_tiny_args(*RUN_FLAGS, "--synthetic_dir", str(data_dir), "--output_dir", str(out_dir), *extra)
    args._explicit = frozenset({"device"})  # as parse_args() would record for the explicit --device cpu
    return args


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=FAMILIES)
def trained(tmp_path_factory, request):
    """Two epochs of a tiny model of each family on 4 generated images; returns (data dir, output dir, stats).

    The tests read the family back from the checkpoint (``_family``) and pass it on with --model.
    """
    base = tmp_path_factory.mktemp(f"e2e_{request.param}")
    data, out = base / "data", base / "run"
    stats = main_module.main(_args(data, out, *FAMILY_FLAGS[request.param], "--epochs", "2", "--lr_drop", "1"))
    yield data, out, stats
    shutil.rmtree(base, ignore_errors=True)  # GBs of checkpoints across the families


def _family(trained) -> str:
    return load_checkpoint(trained[1] / "checkpoint.pth")["args"]["model"]


@pytest.mark.slow
def test_training_writes_log_checkpoints_and_config(trained):
    _, out, stats = trained
    lines = read_log(out / "log.txt")
    assert [line["epoch"] for line in lines] == [0, 1]
    for line in lines:
        assert len(line["test_coco_eval_bbox"]) == 12
        class_loss = f"train_{CLASS_LOSS[_family(trained)]}"
        assert {"train_loss", class_loss, "train_lr", "test_loss", "n_parameters", "elapsed_time"} <= set(line)
    # DINO's box losses swing over 2 iterations with its random denoising noise: its classification loss must fall.
    # RT-DETRv2's varifocal loss grows with the IoU of its matches (its target) while they improve: its GIoU loss.
    falling = {"dino": "train_loss_ce", "rtdetrv2": "train_loss_giou"}.get(_family(trained), "train_loss")
    assert lines[1][falling] < lines[0][falling]
    assert lines[1]["train_lr"] == pytest.approx(lines[0]["train_lr"] * 0.1)  # StepLR(lr_drop=1)
    assert stats["coco_eval_bbox"] == lines[1]["test_coco_eval_bbox"]

    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict) and ckpt["args"]["hidden_dim"] == 32
    assert ckpt["args"]["model"] in FAMILIES  # every checkpoint stores its family
    # lr_drop 1: a numbered copy is kept before every LR drop (published rule).
    assert (out / "checkpoint0000.pth").is_file() and (out / "checkpoint0001.pth").is_file()
    assert load_checkpoint(out / "checkpoint0000.pth")["epoch"] == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    # Synthetic ids go up to 12; RT-DETRv2 numbers its 6 categories (--remap_mscoco_category).
    assert resolved["hidden_dim"] == 32 and resolved["num_classes"] == (6 if _family(trained) == "rtdetrv2" else 13)
    assert (out / "eval" / "latest.pth").is_file() and (out / "eval" / "000.pth").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_eval_resume_reproduces_the_last_evaluation(trained, tmp_path, capsys):
    data, out, _ = trained
    family = _family(trained)
    last = read_log(out / "log.txt")[-1]
    stats = main_module.main(
        _args(data, tmp_path, *FAMILY_FLAGS[family], "--eval", "--resume", str(out / "checkpoint.pth"))
    )
    assert stats["coco_eval_bbox"] == last["test_coco_eval_bbox"]
    assert stats["loss"] == last["test_loss"]  # not just zeros: the losses are reproduced exactly too
    predictions = json.loads((tmp_path / "eval" / "predictions_bbox.json").read_text())
    assert len(predictions) == 2 * DETECTIONS_PER_IMAGE[family]  # 2 val images
    assert json.loads((tmp_path / "eval" / "stats.json").read_text())["test_coco_eval_bbox"] == stats["coco_eval_bbox"]
    assert "per-category AP (bbox" in capsys.readouterr().out
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.slow
def test_eval_resume_without_model_flag_rebuilds_the_checkpoint_family(trained, tmp_path, caplog):
    """``--eval --resume ckpt.pth`` without --model: the checkpoint's stored family, with its defaults."""
    data, out, _ = trained
    family = _family(trained)
    last = read_log(out / "log.txt")[-1]
    common = [*TINY_FLAGS, *RUN_FLAGS, "--synthetic_dir", str(data), "--output_dir", str(tmp_path), "--eval",
              "--resume", str(out / "checkpoint.pth")]  # fmt: skip
    argv = [*common, *FAMILY_FLAGS[family][2:]]
    with caplog.at_level(logging.INFO, logger="detr"):
        args = main_module.parse_args(argv)  # parsing reads the checkpoint's family
        assert args.model == family
        stats = main_module.main(args)
    assert (f"--model {family}: the family of" in caplog.text) == (family != "detr")
    assert stats["coco_eval_bbox"] == last["test_coco_eval_bbox"] and stats["loss"] == last["test_loss"]
    # An explicit --model wins: the deformable checkpoint does not fit DETR (and the reverse). Without the run's
    # DINO flags, which --model detr would refuse first (issue 18).
    other = "detr" if family != "detr" else "deformable_detr"
    with pytest.raises(CheckpointError, match="does not fit this model"):
        main_module.main(main_module.parse_args([*common, "--model", other]))


@pytest.mark.slow
def test_evaluation_uses_eval_batch_size(trained, tmp_path, monkeypatch):
    import engine

    data, out, _ = trained
    family = _family(trained)
    batch_sizes = []
    evaluate = engine.evaluate

    def recording_evaluate(model, criterion, postprocessors, data_loader, *args, **kwargs):
        batch_sizes.append(data_loader.batch_size)
        return evaluate(model, criterion, postprocessors, data_loader, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", recording_evaluate)
    flags = [*FAMILY_FLAGS[family], "--eval", "--resume", str(out / "checkpoint.pth"), "--eval_batch_size", "1"]
    stats = main_module.main(_args(data, tmp_path, *flags))
    assert batch_sizes == [1] and len(stats["coco_eval_bbox"]) == 12
    predictions = json.loads((tmp_path / "eval" / "predictions_bbox.json").read_text())
    assert len(predictions) == 2 * DETECTIONS_PER_IMAGE[family]
    main_module.main(_args(data, tmp_path / "b2", *flags[:-2]))
    assert batch_sizes == [1, 2]  # default: --batch_size


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(trained, tmp_path, monkeypatch):
    data, out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("checkpoint0*", "tensorboard", "eval"))
    before = {name: _sha(run / name) for name in ("checkpoint.pth", "log.txt")}
    build_model = models.build_model

    def build_with_nan_loss(args, num_classes=None):
        model, criterion, postprocessors = build_model(args, num_classes)
        forward = criterion.forward

        def nan_forward(outputs, targets):
            losses = forward(outputs, targets)
            losses["loss_bbox"] = losses["loss_bbox"] + float("nan")
            return losses

        criterion.forward = nan_forward
        return model, criterion, postprocessors

    monkeypatch.setattr(models, "build_model", build_with_nan_loss)
    args = _args(data, run, *FAMILY_FLAGS[_family(trained)], "--resume", str(run / "checkpoint.pth"), "--epochs", "3",
                 "--lr_drop", "1")  # fmt: skip
    with pytest.raises(SystemExit, match=r"non-finite loss .* at epoch 2.*loss_bbox=nan"):
        main_module.main(args)
    assert {name: _sha(run / name) for name in before} == before
    assert not (run / "checkpoint0002.pth").exists()


@pytest.mark.slow
def test_preemption_saves_mid_epoch_and_resume_auto_finishes(trained, tmp_path, monkeypatch):
    """A real SIGTERM after the first step (through the installed handler): checkpoint, exit, resume auto."""
    data, _, _ = trained
    family = _family(trained)
    calls = []
    requested = PreemptionHandler.requested_on_any_rank

    def sigterm_at_first_step(self, device="cpu"):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return requested(self, device)

    monkeypatch.setattr(PreemptionHandler, "requested_on_any_rank", sigterm_at_first_step)
    out = tmp_path / "run"
    main_module.main(_args(data, out, *FAMILY_FLAGS[family], "--epochs", "1"))  # 2 iterations per epoch; stops after 1
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (-1, 1)
    assert not (out / "log.txt").exists()
    main_module.main(_args(data, out, *FAMILY_FLAGS[family], "--epochs", "1", "--resume", "auto"))
    assert len(calls) == 2  # the resumed epoch ran only its second batch
    assert [line["epoch"] for line in read_log(out / "log.txt")] == [0]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torchrun_two_processes(tmp_path, family):
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, *RUN_FLAGS, "--synthetic_dir", str(tmp_path / "data"), "--output_dir", str(out),
             "--epochs", "1", "--max_iters_per_epoch", "2", "--num_workers", "0", *FAMILY_FLAGS[family]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", *flags]
    # Own process group: on a timeout the workers die with torchrun instead of lingering.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "distributed init (rank 0 of 2, gloo)" in stdout
    lines = read_log(out / "log.txt")
    assert len(lines) == 1 and len(lines[0]["test_coco_eval_bbox"]) == 12
    ckpt_args = load_checkpoint(out / "checkpoint.pth")["args"]
    assert ckpt_args["world_size"] == 2 and ckpt_args["model"] == family
    assert stdout.count("final COCO AP") == 1  # only rank 0 reports


def test_frozen_weights_needs_masks(tmp_path):
    with pytest.raises(UsageError, match="--masks"):
        main_module.main(_args(tmp_path, tmp_path / "run", "--frozen_weights", "x.pth"))


def test_flags_that_do_not_fit_together_are_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--masks needs all four ResNet stages"):
        main_module.main(_args(tmp_path, tmp_path / "run", "--masks", "--backbone_stages", "2"))


def test_too_small_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="fewer than --batch_size 8"):
        main_module.main(_args(tmp_path / "data", tmp_path / "run", "--batch_size", "8"))


def test_cli_reports_user_errors_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    with pytest.raises(SystemExit) as info:
        main_module.cli(["--config", str(cfg)])
    message = str(info.value.code)
    assert message.startswith("error: config") and "did you mean 'epochs'?" in message and "\n" not in message


def test_cli_without_arguments_runs_the_demo(monkeypatch, capsys):
    """`python main.py` alone trains the demo on the generated data: nothing to download."""
    seen = []
    monkeypatch.setattr(main_module, "main", lambda args, argv: seen.append(args))
    monkeypatch.setattr(sys, "argv", ["main.py"])
    main_module.cli()
    (args,) = seen
    assert Path(args.config) == main_module.DEMO_CONFIG and args.dataset_file == "synthetic"
    assert args.backbone_weights == "none" and args.backbone_stages == 2
    assert "running the demo" in capsys.readouterr().out
    main_module.cli(["--epochs", "3"])  # any argument: the published defaults, no demo config
    assert seen[1].config is None and seen[1].backbone == "resnet50"


def test_cli_reports_unavailable_imagenet_weights_in_one_line(monkeypatch, tmp_path):
    import torch

    def offline(url, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    flags = list(TINY_FLAGS)
    flags[flags.index("--backbone_weights") + 1] = "imagenet"
    with pytest.raises(SystemExit) as info:
        main_module.cli([*flags, "--synthetic_dir", str(tmp_path / "data"), "--device", "cpu"])
    message = str(info.value.code)
    assert message.startswith("error: --backbone_weights imagenet") and "\n" not in message


@pytest.mark.parametrize(
    "flags, warned",
    [(["--dilation"], True), (["--dilation", "--eval_batch_size", "1"], False), (["--batch_size", "4"], False),
     (["--dilation", "--batch_size", "1"], False)],
)  # fmt: skip
def test_dilated_model_evaluated_in_batches_warns_once(flags, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="detr"):
        main_module.warn_dilated_eval_batch(parse_tiny_args(*flags))
    assert len(caplog.records) == int(warned)
    if warned:
        assert "--eval_batch_size 1" in caplog.records[0].getMessage()


def _custom_coco(root: Path) -> Path:
    """A COCO-format folder of 4 train / 2 val images with categories 1..6 (not the generated set)."""
    from test_coco_dataset import write_coco

    categories = [{"id": i, "name": f"part{i}"} for i in range(1, 7)]
    for split, ids in (("train", range(1, 5)), ("val", range(5, 7))):
        images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in ids]
        annotations = [
            {"id": 10 * i + k, "image_id": i, "category_id": 1 + (i + k) % 6, "bbox": [4 + 20 * k, 6, 18, 20],
             "area": 360.0, "iscrowd": 0}
            for i in ids for k in range(2)
        ]  # fmt: skip
        write_coco(root, split, images, annotations, categories)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_custom_coco_data_with_num_classes(tmp_path, family):
    """--coco_path of the user's own COCO-format data and --num_classes: the class heads get that many outputs."""
    data = _custom_coco(tmp_path / "mydata")
    out = tmp_path / "run"
    args = parse_tiny_args("--model", family, "--coco_path", str(data), "--num_classes", "9", "--input_scale", "0.1",
                           "--batch_size", "2", "--lr_backbone", "0", "--no_progress", "--epochs", "1",
                           "--output_dir", str(out), *FAMILY_FLAGS[family])  # fmt: skip
    args._explicit = frozenset({"device", "coco_path", "num_classes"})
    stats = main_module.main(args)
    assert len(stats["coco_eval_bbox"]) == 12
    state = load_checkpoint(out / "checkpoint.pth")["model"]
    head = CLASS_HEAD[family]
    assert state[head].shape[0] == (10 if family == "detr" else 9)  # DETR adds its "no object" class
    (line,) = read_log(out / "log.txt")
    assert line["train_loss"] > 0 and (out / "eval" / "latest.pth").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_training_run(tmp_path, family):
    """--amp bf16 end to end on a CPU: finite losses, float32 weights in the checkpoint, evaluation."""
    out = tmp_path / "run"
    stats = main_module.main(_args(tmp_path / "data", out, *FAMILY_FLAGS[family], "--amp", "bf16", "--epochs", "1"))
    (line,) = read_log(out / "log.txt")
    assert math.isfinite(line["train_loss"]) and math.isfinite(line["test_loss"]) and len(stats["coco_eval_bbox"]) == 12
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["args"]["amp"] == "bf16" and all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())
