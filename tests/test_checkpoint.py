"""Atomic checkpoint writes, .prev copies, clear load errors, URL loading and --resume auto selection."""

from __future__ import annotations

import argparse
import errno
import functools
import http.server
import io
import logging
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import run.checkpoint as checkpoint_module
from run.checkpoint import (
    CheckpointError,
    checkpoint_args_to_namespace,
    find_resume_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    resume_position,
    save_checkpoint,
)

BIG_NUMEL = 50 * 2**20 // 4  # ~50 MB of float32 per checkpoint


def _payload(step: int, data: torch.Tensor) -> dict:
    return {"step": step, "data": data, "args": argparse.Namespace(step=step)}


def _check_consistent(ckpt: dict, tensors: list[torch.Tensor]) -> None:
    """A checkpoint written by the kill loop: its data tensor is the one that goes with its step."""
    expected = tensors[ckpt["step"] % len(tensors)]
    assert ckpt["args"] == {"step": ckpt["step"]}
    assert torch.equal(ckpt["data"], expected)


def test_kill_during_save_never_corrupts(tmp_path):
    """SIGKILL a process that saves ~50 MB checkpoints in a loop, at random moments: the file always loads."""
    target = tmp_path / "checkpoint.pth"
    # Created before fork so the children save them without computing anything (no OpenMP after fork).
    tensors = [torch.full((BIG_NUMEL,), float(v)) for v in (1.0, 2.0, 3.0)]
    save_checkpoint(_payload(0, tensors[0]), target)
    rng = random.Random(0)
    start_step = 1
    deadline = time.monotonic() + 6.0
    kills = mid_write = 0
    longest_wait = 0.4  # grows while no save completes: a loaded machine writes slower

    def exercised() -> bool:
        return kills >= 6 and time.monotonic() >= deadline and start_step > 3 and mid_write >= 1

    while kills < 60 and not exercised():
        pid = os.fork()
        if pid == 0:  # child: save forever until killed
            try:
                step = start_step
                while True:
                    save_checkpoint(_payload(step, tensors[step % len(tensors)]), target)
                    step += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, longest_wait))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        mid_write += any(tmp_path.glob(".checkpoint.pth.*.tmp"))  # killed with a temporary file open
        ckpt = load_checkpoint(target)
        _check_consistent(ckpt, tensors)
        prev = target.with_name("checkpoint.pth.prev")
        if prev.exists():
            _check_consistent(load_checkpoint(prev), tensors)
        if ckpt["step"] + 1 == start_step:
            longest_wait = min(longest_wait * 1.5, 5.0)
        start_step = ckpt["step"] + 1
    assert start_step > 3, "the child never completed a save: the loop did not exercise replacement"
    assert mid_write >= 1, "no kill landed during a write: the loop did not exercise the dangerous window"
    # Only the two checkpoint files and at most one killed temporary remain; the next save cleans up.
    save_checkpoint(_payload(start_step, tensors[start_step % 3]), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint.pth.prev"]


def test_prev_keeps_the_previous_version(tmp_path):
    target = tmp_path / "sub" / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "epoch": 0}, target)
    assert not target.with_name("checkpoint.pth.prev").exists()
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, target)
    save_checkpoint({"model": {"w": torch.full((2,), 2.0)}, "epoch": 2}, target)
    assert load_checkpoint(target)["epoch"] == 2
    prev = load_checkpoint(str(target) + ".prev")
    assert prev["epoch"] == 1 and torch.equal(prev["model"]["w"], torch.ones(2))


def test_saved_args_are_a_plain_dict(tmp_path):
    args = argparse.Namespace(lr=1e-4, lr_drop=200, output_dir="x")
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"args": args, "epoch": 3}, target)
    raw = torch.load(target, weights_only=True)  # no allow-list needed for this project's files
    assert raw["args"] == {"lr": 1e-4, "lr_drop": 200, "output_dir": "x"}
    assert checkpoint_args_to_namespace(raw["args"]) == args
    assert isinstance(args, argparse.Namespace)  # the caller's object is not modified


def test_missing_and_truncated_files_give_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.pth: no such file"):
        load_checkpoint(tmp_path / "nothere.pth")
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, target)
    target.write_bytes(target.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth is truncated or corrupt") as info:
        load_checkpoint(target)
    assert "\n" not in str(info.value)
    (tmp_path / "list.pth").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


@pytest.fixture
def http_folder(tmp_path):
    """Serve tmp_path/'served' on localhost; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_is_downloaded_to_the_hub_cache_then_reused(http_folder, tmp_path, monkeypatch):
    served, base = http_folder
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    weights = torch.randn(5, 3)
    torch.save({"model": {"w": weights}}, served / "detr-tiny.pth")
    ckpt = load_checkpoint(f"{base}/detr-tiny.pth")
    assert torch.equal(ckpt["model"]["w"], weights)
    assert (hub / "checkpoints" / "detr-tiny.pth").is_file()
    (served / "detr-tiny.pth").unlink()  # a second load reads the cache, not the server
    assert torch.equal(load_checkpoint(f"{base}/detr-tiny.pth")["model"]["w"], weights)
    with pytest.raises(CheckpointError, match="download failed"):
        load_checkpoint(f"{base}/absent.pth")
    assert not (hub / "checkpoints" / "absent.pth").exists()


def test_url_hash_prefix_is_checked_when_asked(http_folder, tmp_path, monkeypatch):
    served, base = http_folder
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    torch.save({"model": {}}, served / "detr-r50-deadbeef.pth")
    with pytest.raises(CheckpointError, match="download failed"):
        load_checkpoint(f"{base}/detr-r50-deadbeef.pth", check_hash=True)
    assert load_checkpoint(f"{base}/detr-r50-deadbeef.pth") == {"model": {}}


def test_resume_position_convention():
    assert resume_position({"epoch": 4}) == (5, 0)
    assert resume_position({"epoch": 4, "iteration": 0}) == (5, 0)
    assert resume_position({"epoch": 4, "iteration": 7}) == (5, 7)
    assert resume_position({"epoch": -1, "iteration": 3}) == (0, 3)


def test_resume_auto_picks_the_most_advanced_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path / "absent") is None
    assert find_resume_checkpoint(tmp_path) is None
    save_checkpoint({"epoch": 0}, tmp_path / "checkpoint0000.pth")
    save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pth")
    save_checkpoint({"epoch": 2, "iteration": 5}, tmp_path / "checkpoint.pth")  # mid-epoch 3
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoint0001.pth")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"not considered")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint.pth"
    path, ckpt = load_latest_checkpoint(tmp_path)
    assert path.name == "checkpoint.pth" and resume_position(ckpt) == (3, 5)


def test_resume_auto_falls_back_when_the_newest_is_corrupt(tmp_path, caplog):
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "model": {"w": torch.randn(100)}}, target)
    save_checkpoint({"epoch": 2, "model": {"w": torch.randn(100)}}, target)
    save_checkpoint({"epoch": 0}, tmp_path / "checkpoint0000.pth")
    target.write_bytes(target.read_bytes()[:-200])  # e.g. a disk problem after the save
    with caplog.at_level(logging.WARNING, logger="run.checkpoint"):
        path, ckpt = load_latest_checkpoint(tmp_path)
    assert path.name == "checkpoint.pth.prev" and ckpt["epoch"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checkpoint.pth is truncated or corrupt" in warnings[0]
    assert "\n" not in warnings[0]
    target.with_name("checkpoint.pth.prev").write_bytes(b"garbage")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint0000.pth"


def test_a_real_training_state_round_trips_with_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-5}, {"params": model[1:].parameters()}], lr=1e-4
    )
    for p in model.parameters():  # AdamW's state after a step (a real step would import torch._dynamo: ~3 s)
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": p.detach() ** 2}
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 200)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": 0,
        "iteration": 17,
        "args": argparse.Namespace(lr=1e-4, backbone="resnet18"),
    }
    save_checkpoint(state, tmp_path / "checkpoint.pth")
    loaded = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    fresh = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-5}, {"params": model[1:].parameters()}], lr=1e-4
    )
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert loaded["lr_scheduler"] == scheduler.state_dict() and loaded["scaler"] == scaler.state_dict()


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"epoch": np.int64(3)}, "checkpoint['epoch']"),
        ({"args": {"coco_path": Path("/data")}}, "checkpoint['args']['coco_path']"),
        ({"extra": [1, {"a": np.ones(2)}]}, "checkpoint['extra'][1]['a']"),
    ],
)
def test_unloadable_values_are_refused_before_writing(tmp_path, bad, where):
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, target)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot save {where}")):
        save_checkpoint(bad, target)
    assert load_checkpoint(target) == {"epoch": 1}


def test_a_failing_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, target)

    def disk_full(obj, f):
        f.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint .* is intact"):
        save_checkpoint({"epoch": 2}, target)
    monkeypatch.undo()
    assert load_checkpoint(target) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


class _FullDisk(io.FileIO):
    """A file that accepts ``room`` bytes, then fails like a full disk (ENOSPC)."""

    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_inside_torch_save_is_one_line_naming_the_os_error(tmp_path, monkeypatch):
    """Issue 15: torch.save turns the ENOSPC into "RuntimeError: [enforce fail at inline_container.cc]"."""
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, target)
    monkeypatch.setattr(checkpoint_module, "open", lambda path, mode: _FullDisk(path, "x"), raising=False)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(10_000)}}, target)
    message = str(err.value)
    assert "\n" not in message and str(target) in message
    assert "No space left on device" in message and f"previous checkpoint {target} is intact" in message
    monkeypatch.undo()
    assert load_checkpoint(target) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 0}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("seed", range(3))
def test_junk_bytes_give_a_checkpoint_error(tmp_path, seed):
    rng = random.Random(seed)
    target = tmp_path / "junk.pth"
    # Tiny junk files make torch.load's weights-only unpickler raise struct.error or IndexError.
    cases = [b"t9\xd2", b"\x80\x02K", b"PK\x03\x04"] + [rng.randbytes(rng.choice([1, 2, 4, 8, 64])) for _ in range(60)]
    for data in cases:
        target.write_bytes(data)
        with pytest.raises(CheckpointError, match=r"junk\.pth") as info:
            load_checkpoint(target)
        assert "\n" not in str(info.value), data


def test_save_after_a_kill_between_link_and_replace_leaves_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 0}, target)
    os.link(target, target.with_name("checkpoint.pth.prev"))  # the state such a kill leaves: two names, one file
    save_checkpoint({"epoch": 1}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint.pth.prev"]
    assert load_checkpoint(target)["epoch"] == 1
    assert load_checkpoint(target.with_name("checkpoint.pth.prev"))["epoch"] == 0
