"""weights_only loading: published-style files with an argparse.Namespace load, code-running pickles are refused."""

from __future__ import annotations

import argparse
import collections
import os
import shlex

import pytest
import torch

from run.checkpoint import CheckpointError, UnsafeCheckpointError, checkpoint_args_to_namespace, load_checkpoint


class _RunsCode:
    """Unpickling this object runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _PlainObject:
    def __init__(self):
        self.value = 3


def _published_style(path, legacy: bool) -> argparse.Namespace:
    args = argparse.Namespace(lr=1e-4, lr_drop=200, backbone="resnet50", aux_loss=True, coco_path=None, ids=[1, 2])
    ckpt = {
        "model": collections.OrderedDict(
            [("class_embed.weight", torch.randn(92, 8)), ("query_embed.weight", torch.randn(100, 8))]
        ),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "lr_scheduler": {"step_size": 200, "last_epoch": 300},
        "epoch": 299,
        "args": args,
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return args


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_published_checkpoint_with_namespace_loads(tmp_path, legacy):
    path = tmp_path / "detr-r50.pth"
    args = _published_style(path, legacy)
    ckpt = load_checkpoint(path)
    assert ckpt["args"] == args and isinstance(ckpt["args"], argparse.Namespace)
    assert checkpoint_args_to_namespace(ckpt["args"]) is ckpt["args"]
    assert list(ckpt["model"]) == ["class_embed.weight", "query_embed.weight"]
    assert ckpt["model"]["class_embed.weight"].shape == (92, 8) and ckpt["epoch"] == 299
    # The allow-list is scoped to our loader: torch's global default stays strict.
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("where", ["top", "inside_args"])
def test_code_running_checkpoint_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = _RunsCode(marker)
    obj = {"model": {}, "x": payload} if where == "top" else {"args": argparse.Namespace(evil=payload)}
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and f"'{os.system.__module__}.system'" in message
    assert "trust" in message  # says how to proceed
    assert not marker.exists()
    # The payload is real: an unrestricted load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_any_other_pickled_class_is_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": {}, "extra": _PlainObject()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"_PlainObject"):
        load_checkpoint(path)
    assert issubclass(UnsafeCheckpointError, CheckpointError)
