"""ONNX export with a dynamic batch (issue 18, item 8): DINO through the dynamo exporter, exported at batch 1, runs at
batch 2 in onnxruntime; a failed parity check ends tools/export_onnx.py with one line."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args

import tools.export_onnx as export_tool
from models import build_model
from run.checkpoint import save_checkpoint

TOLERANCE = 1e-4


def _checkpoint(tmp_path, *flags: str):
    torch.manual_seed(0)
    args = parse_tiny_args(*flags)
    model = build_model(args)[0].eval()
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, path)
    return model, path


@pytest.mark.slow
def test_dino_dynamo_export_at_batch_one_runs_at_batch_two(tmp_path):
    """Exported from one 96 x 128 image with --dynamic: the CLI's check (batch 1, then batch 2 at 72 x 160 with a
    padded image) passes, and another padded batch of two equals eager PyTorch within 1e-4."""
    pytest.importorskip("onnxscript")
    model, ckpt = _checkpoint(tmp_path, *FAMILY_FLAGS["dino"])
    out = tmp_path / "dino.onnx"
    flags = ["--checkpoint", str(ckpt), "--output", str(out), "--height", "96", "--width", "128", "--batch_size", "1"]
    report = export_tool.main([*flags, "--exporter", "dynamo", "--dynamic", "--with_mask", "--check"])
    assert set(report) == {f"{name} {size}" for name in ("pred_logits", "pred_boxes") for size in ("96x128", "72x160")}
    assert max(report.values()) < TOLERANCE

    images = torch.randn(2, 3, 80, 112)
    mask = torch.zeros(2, 80, 112, dtype=torch.bool)
    mask[1, 60:, 70:] = True
    diffs = export_tool.compare_with_onnxruntime(model, out, images, mask)
    assert max(diffs.values()) < TOLERANCE, diffs


def _cli(ckpt, out, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--output", str(out), "--height", "64", "--width", "96", "--check", *extra]


def test_an_output_mismatch_is_one_error_line(tmp_path, monkeypatch, capsys):
    """The model changes after the export (as a wrong graph would): the check names the output, size and difference."""
    _, ckpt = _checkpoint(tmp_path)
    real_export = export_tool.export_onnx

    def export_then_change_the_model(model, *args, **kwargs):
        path = real_export(model, *args, **kwargs)
        with torch.no_grad():
            model.class_embed.bias += 0.5
        return path

    monkeypatch.setattr(export_tool, "export_onnx", export_then_change_the_model)
    out = tmp_path / "detr.onnx"
    with pytest.raises(SystemExit) as exc:
        export_tool.main(_cli(ckpt, out))
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("error: parity check failed: pred_logits 64x96 differs from PyTorch by 5.00e-01 > ")
    assert f"{out} was written" in message
    assert "max |onnxruntime - pytorch|" in capsys.readouterr().out  # the measured differences stay visible


def test_a_graph_onnxruntime_cannot_run_is_one_error_line(tmp_path, monkeypatch, capfd):
    """A graph with the batch and size baked in (what the dynamo exporter wrote for DINO) asked to run a batch of two
    at another size: one line naming the file and the input, no onnxruntime traceback or log."""
    _, ckpt = _checkpoint(tmp_path)
    real_export = export_tool.export_onnx

    def export_fixed_size(model, output, height, width, batch_size, dynamic, *args, **kwargs):
        return real_export(model, output, height, width, batch_size, False, *args, **kwargs)

    monkeypatch.setattr(export_tool, "export_onnx", export_fixed_size)
    out = tmp_path / "baked.onnx"
    with pytest.raises(SystemExit) as exc:
        export_tool.main(_cli(ckpt, out, "--dynamic"))
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"error: parity check failed: onnxruntime cannot run {out} on 2 image(s) of 48x128 (")
    assert "INVALID_ARGUMENT" in message and f"{out} was written" in message
    assert "onnxruntime" not in capfd.readouterr().err
