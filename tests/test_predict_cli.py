"""predict.py, tools/visualize_attention.py, tools/export_onnx.py and the dataset generator as command lines:
one-line errors, class names, readable labels, no import cycle (issue 15: 7, 14, 17)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers import parse_tiny_args
from PIL import Image

import predict
from datasets import synthetic
from models import build_model
from run.checkpoint import save_checkpoint
from tools import export_onnx, visualize_attention

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path, **extra) -> Path:
    args = parse_tiny_args("--input_scale", "0.1", "--num_classes", "3")
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": build_model(args)[0].state_dict(), "args": vars(args), **extra}, path)
    return path


def _image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (128, 128, 128)).save(path)
    return path


@pytest.mark.parametrize("tool", [predict.main, visualize_attention.main])
def test_device_cuda_without_cuda_is_one_line(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(_image(tmp_path)), "--checkpoint", str(_checkpoint(tmp_path)), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        tool([*argv, "--device", "cuda"])
    message = str(info.value.code)
    assert message.startswith("error: --device cuda was requested but CUDA is not available") and "\n" not in message


def test_visualize_attention_takes_categories_and_the_checkpoints_names(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(visualize_attention, "save_attention_maps", lambda *a: seen.append(a[5]) or a[2])
    argv = [str(_image(tmp_path)), "--checkpoint", str(_checkpoint(tmp_path, class_names={1: "cat", 2: "dog"}))]
    visualize_attention.main([*argv, "--device", "cpu", "--output_dir", str(tmp_path / "o")])
    categories = tmp_path / "cats.json"
    categories.write_text('[{"id": 1, "name": "lion"}]')
    visualize_attention.main([*argv, "--device", "cpu", "--categories", str(categories)])
    assert seen == [{1: "cat", 2: "dog"}, {1: "lion"}]


def test_export_onnx_with_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as info:
        export_onnx.main(["--checkpoint", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "m.onnx")])
    message = str(info.value.code)
    assert message.startswith("error: checkpoint") and "no such file; check the --checkpoint path" in message


def test_generating_into_an_existing_folder_is_one_line(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--out", str(tmp_path), "--train_size", "10"])
    assert str(info.value.code).startswith(f"error: {tmp_path}: exists but is not a complete synthetic dataset")
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_label_font_scales_with_the_image_and_labels_stay_inside():
    assert predict.label_font_size(64, 48) < predict.label_font_size(640, 480) < predict.label_font_size(1920, 1080)
    size = (60, 40)
    for box in ([0, 0, 30, 20], [50, 2, 60, 40], [-5, 38, 10, 40], [10, 20, 30, 30]):
        x, y = predict.label_position((25, 9), box, size)
        assert 0 <= x and x + 25 <= size[0] and 0 <= y and y + 9 <= size[1], box
    assert predict.label_position((25, 9), [10, 20, 30, 30], size) == (10, 11)  # above the box when it fits


def test_drawn_labels_of_a_box_at_the_top_edge_are_inside_the_image():
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    detections = {"boxes": torch.tensor([[40.0, 0.0, 63.0, 20.0]]), "labels": torch.tensor([1]),
                  "scores": torch.tensor([0.9])}  # fmt: skip
    drawn = predict.draw_detections(image, detections, {1: "a long class name"})
    lime = (drawn == torch.tensor([0, 255, 0])[:, None, None]).all(0)
    assert lime[:8].any() and lime[:, :40].any()  # the label sits inside the top rows, moved left to fit


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_predict_and_visualize_attention_do_not_import_each_other():
    assert not {m for m in _imports(ROOT / "predict.py") if m.startswith("tools.visualize_attention")}
    assert "predict" not in _imports(ROOT / "tools" / "attention_maps.py")
    assert "tools.attention_maps" in _imports(ROOT / "tools" / "visualize_attention.py")


def test_help_names_every_family_and_no_fake_program():
    """Issue 18 item 13: --help said 'usage: DETR prediction ...' (a program name that is not a command)."""
    for parser in (predict.get_args_parser(), visualize_attention.get_args_parser()):
        text = " ".join(parser.format_help().split())
        assert not text.startswith("usage: DETR") and "Deformable DETR" in text and "DINO" in text
