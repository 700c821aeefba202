"""Starting a run from weights: --resume (auto, folders, mismatches), --finetune hints (issue 15: 3, 8, 13, 16)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import models
from cli.config import config_dict
from run.checkpoint import CheckpointError, find_resume_checkpoint, save_checkpoint
from run.finetune import load_for_finetuning
from run.run_state import TrainState, load_weights


def _state(args) -> TrainState:
    model, _, _ = models.build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return TrainState(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 10), torch.amp.GradScaler("cpu"))


def test_resume_auto_ignores_an_older_run_in_the_same_folder(tmp_path):
    """The older run's checkpoint0006.pth is further along, but the newest run wrote checkpoint.pth."""
    save_checkpoint({"model": {}, "epoch": 6, "run_id": "old"}, tmp_path / "checkpoint0006.pth")
    os.utime(tmp_path / "checkpoint0006.pth", (1, 1))
    save_checkpoint({"model": {}, "epoch": 1, "run_id": "new"}, tmp_path / "checkpoint.pth")
    save_checkpoint({"model": {}, "epoch": 2, "run_id": "new"}, tmp_path / "checkpoint.pth")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint.pth"
    (tmp_path / "checkpoint.pth").write_bytes(b"junk")  # unreadable: its own run's .prev, not the old run
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint.pth.prev"


def test_checkpoints_carry_a_run_id_kept_by_a_resume(tiny_args):
    args = tiny_args("--num_classes", "5")
    first, second = _state(args), _state(args)
    assert first.run_id != second.run_id
    ckpt = first.checkpoint(args, epoch=0)
    assert ckpt["run_id"] == first.run_id
    second.restore(ckpt, args)
    assert second.checkpoint(args, epoch=1)["run_id"] == first.run_id


def test_resume_of_a_folder_says_it_is_a_folder(tmp_path, tiny_args):
    save_checkpoint({"model": {}}, tmp_path / "checkpoint.pth")
    args = tiny_args("--num_classes", "5", "--resume", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"is a folder \(holding checkpoint\.pth\); pass a file such as"):
        load_weights(args, _state(args))


def test_resume_auto_without_output_dir_is_an_error(tiny_args):
    args = tiny_args("--num_classes", "5", "--resume", "auto")
    with pytest.raises(CheckpointError, match="--resume auto .* pass --output_dir"):
        load_weights(args, _state(args))


def test_missing_finetune_checkpoint_does_not_suggest_resume_auto(tmp_path, tiny_args):
    model, _, _ = models.build_model(tiny_args("--num_classes", "5"))
    with pytest.raises(CheckpointError, match="no such file; check the --finetune path") as err:
        load_for_finetuning(model, str(tmp_path / "missing.pth"))
    assert "--resume auto" not in str(err.value)


def test_mismatch_is_summarised_with_the_checkpoints_differing_flags(tmp_path, tiny_args):
    trained = tiny_args("--num_classes", "5", "--hidden_dim", "64", "--enc_layers", "2")
    saved = _state(trained).checkpoint(trained, epoch=0)
    save_checkpoint(saved, tmp_path / "ckpt.pth")
    args = tiny_args("--num_classes", "9", "--eval", "--resume", str(tmp_path / "ckpt.pth"))
    with pytest.raises(CheckpointError) as err:
        load_weights(args, _state(args))
    message = str(err.value)
    assert len(message) < 1500 and "\n" not in message
    assert "missing keys" not in message and "unexpected keys (e.g." in message and "shape mismatches (e.g." in message
    assert "--hidden_dim 64 (this run 32)" in message and "--enc_layers 2 (this run 1)" in message
    assert "--num_classes 5 (this run 9)" in message


def test_eval_resume_does_not_report_a_training_position(tmp_path, tiny_args, caplog):
    args = tiny_args("--num_classes", "5")
    save_checkpoint(_state(args).checkpoint(args, epoch=3), tmp_path / "ckpt.pth")
    args = tiny_args("--num_classes", "5", "--eval", "--resume", str(tmp_path / "ckpt.pth"))
    with caplog.at_level(logging.INFO, logger="detr"):
        assert load_weights(args, _state(args)) == 0
    assert "next epoch" not in caplog.text and "evaluating the weights of" in caplog.text
    assert args.start_epoch == 0 and config_dict(args)["start_epoch"] == 0
