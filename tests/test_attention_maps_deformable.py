"""Attention pictures of Deformable DETR and DINO (issue 18: 7, 13): the sampling points drawn equal a hand
computation from the module's weights, both tools write PNGs, the predictions survive a drawing failure, and
the default output folder is beside the checkpoint (and ignored by git)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args
from PIL import Image

import predict
from models import build_model
from run.checkpoint import save_checkpoint
from tools import attention_maps, visualize_attention
from tools.attention_maps import capture_sampling_points, save_attention_maps

ROOT = Path(__file__).resolve().parents[1]
FOCAL = ["deformable_detr", "dino"]


def _perturb(model: torch.nn.Module) -> None:
    """Query-dependent offsets and weights: the published init zeroes both weight matrices."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.transformer.decoder.layers:
            for linear in (layer.cross_attn.sampling_offsets, layer.cross_attn.attention_weights):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)


def _model(family: str, *flags: str):
    args = parse_tiny_args(*FAMILY_FLAGS[family], "--input_scale", "0.1", "--num_feature_levels", "3", *flags)
    model = build_model(args)[0].eval()
    _perturb(model)
    return model, args


def _hand_locations(query: list[float], reference: list[list[float]], shapes, attention, q: int):
    """Sampling locations and weights of ONE query by loops, as DESIGN_DEFORMABLE.md states the rule.

    Returns {(head, level, point): ((x, y), weight)}.
    """
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    w_off, b_off = (t.detach().double() for t in (attention.sampling_offsets.weight, attention.sampling_offsets.bias))
    w_att, b_att = (t.detach().double() for t in (attention.attention_weights.weight, attention.attention_weights.bias))
    x = torch.tensor(query, dtype=torch.float64)
    result = {}
    for m in range(heads):
        logits = {}
        for lvl in range(levels):
            for p in range(points):
                row = (m * levels + lvl) * points + p
                logits[lvl, p] = float(w_att[row] @ x + b_att[row])
        total = sum(math.exp(v) for v in logits.values())
        for lvl in range(levels):
            height, width = shapes[lvl]
            ref = reference[lvl]
            for p in range(points):
                row = ((m * levels + lvl) * points + p) * 2
                dx, dy = float(w_off[row] @ x + b_off[row]), float(w_off[row + 1] @ x + b_off[row + 1])
                if len(ref) == 2:  # point reference: offsets in pixels of the level
                    xy = (ref[0] + dx / width, ref[1] + dy / height)
                else:  # box reference: offsets relative to half the box size, per point
                    xy = (ref[0] + dx / points * ref[2] * 0.5, ref[1] + dy / points * ref[3] * 0.5)
                result[m, lvl, p] = (xy, math.exp(logits[lvl, p]) / total)
    return result


@pytest.mark.parametrize(("family", "flags"), [("deformable_detr", ()), ("dino", ()),
                                               ("deformable_detr", ("--with_box_refine", "--two_stage"))])  # fmt: skip
def test_sampling_points_equal_a_hand_computation(family, flags):
    model, _ = _model(family, *flags)
    image = torch.randn(3, 80, 112)
    attention = model.transformer.decoder.layers[-1].cross_attn
    seen = {}

    def keep(_module, args):
        seen["query"], seen["reference"], seen["shapes"] = args[0], args[1], args[3]

    handle = attention.register_forward_pre_hook(keep)
    maps = capture_sampling_points(model, image)
    handle.remove()

    queries = seen["query"].shape[1]
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    assert maps.locations.shape == (queries, heads, levels, points, 2)
    assert maps.weights.shape == (queries, heads, levels, points)
    assert seen["reference"].shape[-1] == (2 if family == "deformable_detr" and not flags else 4)
    shapes = [tuple(int(v) for v in hw) for hw in torch.as_tensor(seen["shapes"]).tolist()]
    for q in (0, queries - 1):
        expected = _hand_locations(seen["query"][0, q].tolist(), seen["reference"][0, q].tolist(), shapes, attention, q)
        for (m, lvl, p), ((x, y), weight) in expected.items():
            assert maps.locations[q, m, lvl, p].tolist() == pytest.approx([x, y], abs=1e-5)
            assert float(maps.weights[q, m, lvl, p]) == pytest.approx(weight, abs=1e-6)
    # Query-dependent: the perturbed weights move the points of different queries differently.
    assert not torch.allclose(maps.locations[0] - maps.references[0, None, None, None], maps.locations[1] -
                              maps.references[1, None, None, None])  # fmt: skip
    assert maps.self_attention.shape == (queries, queries)
    torch.testing.assert_close(maps.self_attention.sum(-1), torch.ones(queries))
    with torch.no_grad():  # capturing does not change the predictions
        plain = model(image[None])
    torch.testing.assert_close(maps.outputs["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=1e-5)


def _checkpoint_and_image(tmp_path, family):
    model, args = _model(family, "--num_classes", "4")
    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = folder / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(args), "class_names": {1: "cat", 3: "dog"}}, ckpt)
    image = tmp_path / "photo.png"
    pixels = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(image)
    return ckpt, image


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size


@pytest.mark.parametrize("family", FOCAL)
def test_both_tools_draw_deformable_models(family, tmp_path, monkeypatch):
    ckpt, image = _checkpoint_and_image(tmp_path, family)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    written = visualize_attention.main([str(image), "--checkpoint", str(ckpt), "--device", "cpu", "--threshold", "0"])
    # Default folder: beside the checkpoint, nothing in the working directory.
    assert written == [ckpt.parent / "attention" / "photo_attention.png"]
    assert _png(written[0])[0] > 300 and list(work.iterdir()) == []

    out = tmp_path / "pred"
    argv = [str(image), "--checkpoint", str(ckpt), "--device", "cpu", "--output_dir", str(out), "--no_progress"]
    results = predict.main([*argv, "--attention_maps", "--threshold", "0.0"])
    assert _png(out / "photo_attention.png")[0] > 300
    assert json.loads((out / "predictions.json").read_text()) == results and results
    assert {r["category_id"] for r in results} <= {1, 3}


def test_the_drawn_figure_shows_the_points_of_the_chosen_queries(tmp_path, monkeypatch):
    """The scatter drawn for a query is its captured locations in image pixels, sized by weight."""
    model, _ = _model("deformable_detr")
    image = Image.fromarray(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy())
    drawn = []
    original = attention_maps._draw_sampling_points

    def spy(fig, image, maps, objects, names):
        original(fig, image, maps, objects, names)
        drawn.append((fig, maps, objects))

    monkeypatch.setattr(attention_maps, "_draw_sampling_points", spy)
    save_attention_maps(model, image, tmp_path / "a.png", threshold=0.0, input_scale=0.1, max_objects=2)
    [(fig, maps, objects)] = drawn
    first = fig.axes[0]
    query = objects[0][0]
    offsets = torch.cat([torch.as_tensor(c.get_offsets()) for c in first.collections])
    expected = maps.locations[query].permute(1, 0, 2, 3).reshape(-1, 2) * torch.tensor([64.0, 48.0])
    torch.testing.assert_close(offsets.float(), expected, atol=1e-4, rtol=0)
    sizes = torch.cat([torch.as_tensor(c.get_sizes()) for c in first.collections])
    torch.testing.assert_close(sizes.float(), maps.weights[query].permute(1, 0, 2).reshape(-1) * 300)


def test_predictions_survive_a_failing_attention_drawing(tmp_path, monkeypatch):
    ckpt, image = _checkpoint_and_image(tmp_path, "dino")

    def broken(*_args, **_kwargs):
        raise RuntimeError("drawing exploded\nsecond line")

    monkeypatch.setattr(attention_maps, "save_attention_maps", broken)
    out = tmp_path / "pred"
    argv = [str(image), "--checkpoint", str(ckpt), "--device", "cpu", "--output_dir", str(out), "--no_progress"]
    with pytest.raises(SystemExit) as info:
        predict.main([*argv, "--attention_maps", "--threshold", "0.0"])
    message = str(info.value.code)
    assert message.startswith("error: attention maps failed on") and "\n" not in message
    assert "drawing exploded" in message and str(out / "predictions.json") in message
    assert json.loads((out / "predictions.json").read_text())  # written, with the detections
    assert (out / "photo.png").is_file()


def test_visualize_attention_with_a_url_needs_an_output_dir(tmp_path):
    with pytest.raises(SystemExit) as info:
        visualize_attention.main([str(tmp_path), "--checkpoint", "https://example.com/m.pth", "--device", "cpu"])
    assert str(info.value.code) == (
        "error: --checkpoint https://example.com/m.pth is a URL: pass --output_dir for the attention PNGs"
    )


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
@pytest.mark.parametrize("path", ["attention/photo_attention.png", "predictions/predictions.json"])
def test_default_output_folders_are_ignored_by_git(path):
    """A checkpoint in the repository root puts the default folders there: git must not offer them."""
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False)
    assert done.returncode == 0, f"{path} is not in .gitignore"
