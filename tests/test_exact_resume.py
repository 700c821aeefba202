"""Exact resume on CPU (DETR, Deformable DETR and DINO): a run split by an epoch-boundary or a mid-epoch checkpoint
equals the straight run bit for bit.

Dropout and the training augmentations (random flip/resize/crop, python ``random``) are on, so every generator
the checkpoint restores matters. Loading uses ``--num_workers 0``: with worker processes the augmentation RNG
lives in the workers, is seeded from the loader's base seed when they start, and is not part of the
checkpoint, so a resumed run re-seeds it (the model still resumes exactly; the augmentation draws differ).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args

import main as main_module
from run.checkpoint import load_checkpoint
from run.preemption import PreemptionHandler
from util.logging import read_log

# 6 images at batch 2: 3 iterations per epoch; no evaluation until the last epoch (it costs time; evaluating
# every epoch is tested on its own below).
RUN_FLAGS = ["--synthetic_train_size", "6", "--synthetic_val_size", "1", "--input_scale", "0.1",
             "--batch_size", "2", "--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_drop", "1", "--dropout", "0.1",
             "--no_progress", "--num_workers", "0", "--eval_every", "100"]  # fmt: skip


def _run(data: Path, out: Path, *extra: str) -> None:
    args = parse_tiny_args(*RUN_FLAGS, "--synthetic_dir", str(data), "--output_dir", str(out), *extra)
    args._explicit = frozenset({"device"})
    torch.manual_seed(1234)  # the run must not depend on the caller's generator state either
    main_module.main(args)


def _assert_same_model(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pth"), load_checkpoint(b / "checkpoint.pth")
    assert ca["epoch"] == cb["epoch"]
    assert ca["model"].keys() == cb["model"].keys()
    differing = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    state_a, state_b = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    assert ca["lr_scheduler"] == cb["lr_scheduler"]


def _train_losses(out: Path) -> list[float]:
    return [line["train_loss"] for line in read_log(out / "log.txt")]


@pytest.fixture(scope="module", params=list(FAMILY_FLAGS))
def straight(tmp_path_factory, request):
    """Two epochs without interruption: (data dir, output dir, model flags), for each family."""
    base = tmp_path_factory.mktemp(f"straight_{request.param}")
    model = FAMILY_FLAGS[request.param]  # DINO: its denoising noise is drawn from the restored generators too
    _run(base / "data", base / "run", *model, "--epochs", "2")
    yield base / "data", base / "run", model
    shutil.rmtree(base, ignore_errors=True)  # four checkpoints of ~0.1-0.2 GB each


def test_epoch_boundary_resume_is_bit_identical(straight, tmp_path):
    data, reference, model = straight
    out = tmp_path / "run"
    _run(data, out, *model, "--epochs", "1")
    _run(data, out, *model, "--epochs", "2", "--resume", "auto")
    _assert_same_model(reference, out)
    assert _train_losses(out) == _train_losses(reference)  # exact floats, both epochs


def test_mid_epoch_resume_is_bit_identical(straight, tmp_path, monkeypatch):
    data, reference, model = straight
    steps = []
    stop_after = 4  # epoch 1, after its first batch (3 batches per epoch)

    def preempt_once(self, device="cpu"):
        steps.append(1)
        self.requested, self.signal_name = len(steps) == stop_after, "SIGUSR1"
        return self.requested

    monkeypatch.setattr(PreemptionHandler, "requested_on_any_rank", preempt_once)
    out = tmp_path / "run"
    _run(data, out, *model, "--epochs", "2", "--checkpoint_every", "1")
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt.get("iteration")) == (0, 1)
    _run(data, out, *model, "--epochs", "2", "--checkpoint_every", "1", "--resume", "auto")
    assert len(steps) == 6  # 4 batches, then the 2 remaining ones of epoch 1: none repeated, none skipped
    _assert_same_model(reference, out)
    assert _train_losses(out) == _train_losses(reference)


@pytest.mark.parametrize("family", ["detr", "rtdetrv2"])
def test_resume_with_evaluation_every_epoch_is_bit_identical(family, tmp_path):
    """--eval_every 1: the evaluation after each epoch (its loader draws a seed) must not shift the training RNG
    a checkpoint captured before it; losses of training and evaluation are compared as exact floats."""
    model = [*FAMILY_FLAGS[family], "--eval_every", "1"]
    reference, out = tmp_path / "straight", tmp_path / "split"
    _run(tmp_path / "data", reference, *model, "--epochs", "3")
    _run(tmp_path / "data", out, *model, "--epochs", "1")
    _run(tmp_path / "data", out, *model, "--epochs", "3", "--resume", "auto")
    _assert_same_model(reference, out)
    logged = [read_log(run / "log.txt") for run in (reference, out)]
    assert [len(lines) for lines in logged] == [3, 3]
    for key in ("train_loss", "test_loss"):
        assert [line[key] for line in logged[1]] == [line[key] for line in logged[0]], key
    # The logged lr is --lr's group (RT-DETRv2's group 0 is the backbone at --lr_backbone 1e-4), dropped per epoch.
    assert [line["train_lr"] for line in logged[1]] == pytest.approx([1e-3, 1e-4, 1e-5], rel=1e-9)
