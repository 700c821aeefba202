"""main.py as a new user meets it: one run per folder, resume commands, stored config and names (issue 15)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_FLAGS
from test_main_e2e import _args

import main as main_module
from cli.config import UsageError
from run.checkpoint import load_checkpoint, save_checkpoint
from run.preemption import PreemptionHandler
from run.run_dir import next_free_run_dir, resume_command
from util.logging import read_log


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of a tiny model on 4 generated images: (data dir, output dir)."""
    base = tmp_path_factory.mktemp("runs")
    data, out = base / "data", base / "run"
    main_module.main(_args(data, out, "--epochs", "1"))
    yield data, out
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_checkpoints_store_the_category_names_and_a_run_id(run):
    _, out = run
    ckpt = load_checkpoint(out / "checkpoint.pth")
    names = ckpt["class_names"]
    assert len(names) >= 3 and all(isinstance(k, int) and isinstance(v, str) for k, v in names.items())
    assert isinstance(ckpt["run_id"], str) and len(ckpt["run_id"]) == 16


@pytest.mark.slow
def test_a_new_run_into_another_runs_folder_is_refused(run):
    data, out = run
    before = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(UsageError, match=r"already holds another run \(checkpoint.pth, .*log.txt\); continue it"):
        main_module.main(_args(data, out, "--epochs", "1"))
    assert (out / "checkpoint.pth").read_bytes() == before and len(read_log(out / "log.txt")) == 1


@pytest.mark.slow
def test_config_yaml_after_a_resume_holds_the_run_not_the_resume_state(run, tmp_path):
    data, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("tensorboard", "eval"))
    main_module.main(_args(data, copy, "--epochs", "2", "--resume", "auto"))
    assert [line["epoch"] for line in read_log(copy / "log.txt")] == [0, 1]
    resolved = yaml.safe_load((copy / "config.yaml").read_text())
    assert "start_epoch" not in resolved and "resume" not in resolved and resolved["epochs"] == 2


@pytest.mark.slow
def test_eval_resume_does_not_download_imagenet_weights(run, tmp_path, monkeypatch):
    data, out = run

    def offline(url, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    args = _args(data, tmp_path / "eval", "--eval", "--resume", str(out / "checkpoint.pth"))
    args.backbone_weights = "imagenet"  # the published default
    stats = main_module.main(args)
    assert len(stats["coco_eval_bbox"]) == 12 and args.backbone_weights == "imagenet"


@pytest.mark.slow
def test_preemption_prints_the_exact_command_that_resumes(run, tmp_path, monkeypatch, caplog):
    data, _ = run

    def signal_now(self, device="cpu"):
        self.requested, self.signal_name = True, "SIGTERM"
        return True

    monkeypatch.setattr(PreemptionHandler, "requested_on_any_rank", signal_now)
    args = _args(data, tmp_path / "run", "--epochs", "1")
    argv = ["--config", "configs/demo.yaml", "--resume", "x.pth", "--lr", "1e-3"]
    with caplog.at_level(logging.INFO, logger="detr"):
        main_module.main(args, argv)
    expected = "continue with: python main.py --config configs/demo.yaml --lr 1e-3 --resume auto"
    assert expected in caplog.text


def test_resume_command_of_the_argument_less_demo():
    argv = ["--config", str(main_module.DEMO_CONFIG)]
    assert resume_command(argv, "python main.py") == f"python main.py --config {main_module.DEMO_CONFIG} --resume auto"
    assert resume_command(["--resume=a.pth", "--epochs", "3"], "p") == "p --epochs 3 --resume auto"


def test_the_argument_less_demo_records_its_command_and_never_reuses_a_finished_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # configs/demo.yaml writes to runs/demo, relative to the working folder
    save_checkpoint({"model": {}, "epoch": 7}, tmp_path / "runs" / "demo" / "checkpoint.pth")
    seen = []
    monkeypatch.setattr(main_module, "main", lambda args, argv: seen.append((args, argv)))
    monkeypatch.setattr(sys, "argv", ["main.py"])
    main_module.cli()
    ((args, argv),) = seen
    assert argv == ["--config", str(main_module.DEMO_CONFIG), "--output_dir", str(Path("runs/demo_2"))]
    assert Path(args.output_dir) == Path("runs/demo_2") == next_free_run_dir("runs/demo")


def test_resume_auto_without_output_dir_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="error: --resume auto .* pass --output_dir"):
        main_module.cli([*TINY_FLAGS, "--resume", "auto", "--synthetic_dir", str(tmp_path), "--epochs", "1",
                         "--synthetic_train_size", "2", "--synthetic_val_size", "2", "--batch_size", "1",
                         "--max_iters_per_epoch", "1"])  # fmt: skip


def test_finetune_architecture_mismatch_is_one_line(tmp_path):
    save_checkpoint({"model": {"transformer.encoder.layers.5.linear1.weight": torch.zeros(2, 2)}}, tmp_path / "c.pth")
    flags = [*TINY_FLAGS, "--finetune", str(tmp_path / "c.pth"), "--synthetic_dir", str(tmp_path / "data")]
    flags += ["--synthetic_train_size", "2", "--synthetic_val_size", "2", "--batch_size", "1", "--epochs", "1"]
    with pytest.raises(SystemExit) as info:
        main_module.cli(flags)
    message = str(info.value.code)
    assert message.startswith("error: ") and "no place in this model" in message and "\n" not in message


def test_metrics_of_every_kind_are_printed_and_logged():
    stats = {"coco_eval_bbox": [0.4] + [0.0] * 11, "coco_eval_masks": [0.3] + [0.0] * 11}
    stats |= {k: {"pq": 0.5, "sq": 0.8, "rq": 0.6, "n": 3} for k in ("PQ_all", "PQ_th", "PQ_st")}
    line = main_module._metrics_line(stats)
    assert line == "bbox AP 0.400, segm AP 0.300, PQ 50.0 (SQ 80.0, RQ 60.0; things 50.0, stuff 50.0)"
    scalars = main_module._metric_scalars(stats)
    assert set(scalars) == {"test/bbox_", "test/segm_", "test/PQ_all_", "test/PQ_th_", "test/PQ_st_"}
    assert scalars["test/segm_"]["AP"] == 0.3 and scalars["test/PQ_all_"] == {"pq": 0.5, "sq": 0.8, "rq": 0.6}


@pytest.mark.slow
def test_skipped_samples_are_counted_once_per_epoch_in_the_log(run, tmp_path, caplog):
    data, _ = run
    (train,) = Path(data).rglob("train2017")
    root = tmp_path / "coco"
    shutil.copytree(train.parent, root)
    next(iter(sorted((root / "train2017").iterdir()))).unlink()
    args = _args(data, tmp_path / "out", "--epochs", "2", "--skip_bad_images", "--coco_path", str(root))
    args.dataset_file = "coco"
    with caplog.at_level(logging.WARNING):
        main_module.main(args)
    lines = read_log(tmp_path / "out" / "log.txt")
    assert [line.get("train_skipped_samples") for line in lines] == [1, 1]
    per_sample = [r for r in caplog.records if r.getMessage().startswith("skipping sample")]
    per_epoch = [r for r in caplog.records if "skipped 1 unreadable training samples" in r.getMessage()]
    assert len(per_sample) == 1 and len(per_epoch) == 2
