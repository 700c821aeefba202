"""predict.py: checkpoint -> rebuilt model -> COCO-results JSON and PNGs that match the model's outputs."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args
from PIL import Image

import predict
from models import build_model
from models.box_refinement import DINO_EPS
from run.checkpoint import save_checkpoint
from run.model_loading import load_model
from util.class_names import COCO_CLASSES, resolve_class_names
from util.misc import nested_tensor_from_tensor_list

SIZES = [(64, 48), (40, 72), (56, 56)]  # (width, height)
# These tests reach into DETR-style class heads and DETR's eval transform; RT-DETRv2's prediction path (its own
# 640 x 640 transform, category ids from the stored class names) is tested in tests/test_rtdetrv2_family.py.
FAMILIES = [family for family in FAMILY_FLAGS if family != "rtdetrv2"]
# Detections kept per image by the top-k postprocessors: Deformable DETR 100, DINO --num_select (FAMILY_FLAGS).
TOP_K = {"deformable_detr": 100, "dino": 20}


def _family_flags(family):
    return FAMILY_FLAGS[family]


def _images(folder, color=None):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    generator = torch.Generator().manual_seed(1)
    for index, (width, height) in enumerate(SIZES):
        if color is None:
            pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
            image = Image.fromarray(pixels.numpy())
        else:
            image = Image.new("RGB", (width, height), color)
        path = folder / f"img{index}.{'png' if index % 2 else 'jpg'}"
        image.save(path)
        paths.append(path)
    return paths


def _checkpoint(tmp_path, *flags, name="ckpt.pth", plant=None, **extra):
    args = parse_tiny_args("--input_scale", "0.1", *flags)
    model = build_model(args)[0]
    if plant is not None:
        plant(model)
    path = tmp_path / name
    save_checkpoint({"model": model.state_dict(), "args": vars(args), **extra}, path)
    return path, model.eval(), args


def test_eval_transform_follows_the_published_size_rule():
    def shape(width, height, scale):
        return tuple(predict.eval_transform(Image.new("RGB", (width, height)), scale).shape)

    # short side 80 (800 * 0.1), long side capped at 133 (1333 * 0.1)
    assert shape(64, 48, 0.1) == (3, 80, 106)
    # 72 / 40 * 80 = 144 > 133: short side becomes round(133 * 40 / 72) = 74, long int(74 * 72 / 40) = 133
    assert shape(40, 72, 0.1) == (3, 133, 74)
    # short side round(133 * 40 / 200) = 27, long int(27 * 200 / 40) = 135 (the published rounding)
    assert shape(40, 200, 0.1) == (3, 135, 27)
    assert shape(100, 80, 0.1) == (3, 80, 100)  # short side already 80: unchanged
    # ImageNet normalisation: a white image becomes (1 - mean) / std per channel.
    white = predict.eval_transform(Image.new("RGB", (80, 80), (255, 255, 255)), 0.1)
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    torch.testing.assert_close(white.mean((1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)


def _expected_detections(outputs, offset, family):
    """(label, score, query) of every detection the postprocessor keeps for image ``offset``, in its order."""
    if family == "detr":  # softmax over K + 1 classes, the best real class per query
        score, label = outputs["pred_logits"][offset].softmax(-1)[:, :-1].max(-1)
        return [(int(lab), float(sc), q) for q, (lab, sc) in enumerate(zip(label, score))]
    prob = outputs["pred_logits"][offset].sigmoid()  # Deformable DETR, DINO: the best (query, class) pairs
    num_classes = prob.shape[1]
    ranked = sorted(((float(p), q, c) for (q, c), p in np.ndenumerate(prob.numpy())), key=lambda x: -x[0])
    return [(c, sc, q) for sc, q, c in ranked[: min(TOP_K[family], prob.numel())]] if num_classes else []


@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_json_matches_the_model_outputs(tmp_path, family):
    ckpt, model, args = _checkpoint(tmp_path, *_family_flags(family))
    paths = _images(tmp_path / "images")
    out = tmp_path / "out"
    results = predict.main(
        [
            str(tmp_path / "images"),
            "--checkpoint",
            str(ckpt),
            "--output_dir",
            str(out),
            "--threshold",
            "0.0",
            "--device",
            "cpu",
            "--batch_size",
            "2",
            "--no_progress",
        ]
    )
    assert json.loads((out / "predictions.json").read_text()) == results
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    for path, (width, height) in zip(paths, SIZES):
        with Image.open(out / f"{path.stem}.png") as drawn:
            assert drawn.size == (width, height)

    # Independent oracle: same batches through the model, boxes scaled by hand to original pixels.
    expected = []
    for start in range(0, len(paths), 2):
        batch = paths[start : start + 2]
        images = [Image.open(p).convert("RGB") for p in batch]
        with torch.no_grad():
            outputs = model(nested_tensor_from_tensor_list([predict.eval_transform(im, 0.1) for im in images]))
        for offset, (path, image) in enumerate(zip(batch, images)):
            for label, score, query in _expected_detections(outputs, offset, family):
                cx, cy, w, h = outputs["pred_boxes"][offset, query].tolist()
                x0, y0 = (cx - w / 2) * image.width, (cy - h / 2) * image.height
                expected.append((start + offset, str(path), label, [x0, y0, w * image.width, h * image.height], score))
    per_image = args.num_queries if family == "detr" else TOP_K[family]  # the top-k of Q x 91 (query, class) pairs
    assert len(results) == len(expected) == len(paths) * per_image
    for result, (image_id, file_name, label, bbox, score) in zip(results, expected):
        assert (result["image_id"], result["file_name"], result["category_id"]) == (image_id, file_name, label)
        assert result["category_name"] == COCO_CLASSES[label]
        assert result["bbox"] == pytest.approx(bbox, abs=1e-3)
        assert result["score"] == pytest.approx(score, abs=1e-5)


def _plant_center_box(model):
    """Every query predicts class 1 with logit 2 (the others 0) and the box (cx, cy, w, h) = (.5, .5, .5, .5).

    DETR's score is e^2 / (e^2 + 3) (softmax with "no object"); Deformable DETR's sigmoid(2). Deformable DETR's
    box is relative to its reference point: zero reference weights put it at sigmoid(0) = 0.5. DINO's reference
    boxes come from the encoder: a -1e4 encoder box bias makes them 0 (logit log(1e-3) = c after its clamp); then the
    L look-forward-twice layers with a box bias b end at sigmoid(L * b + c), so b = -c / L gives 0.5.
    """
    class_heads = model.class_embed if isinstance(model.class_embed, torch.nn.ModuleList) else [model.class_embed]
    box_heads = model.bbox_embed if isinstance(model.bbox_embed, torch.nn.ModuleList) else [model.bbox_embed]
    with torch.no_grad():
        for head in class_heads:
            head.weight.zero_()
            head.bias.zero_()
            head.bias[1] = 2.0
        for head in box_heads:
            head.layers[-1].weight.zero_()
            head.layers[-1].bias.zero_()  # sigmoid(0) = 0.5
        if hasattr(model.transformer, "reference_points"):
            model.transformer.reference_points.weight.zero_()
            model.transformer.reference_points.bias.zero_()
        if hasattr(model, "label_enc"):  # DINO
            encoder_box = model.transformer.enc_out_bbox_embed.layers[-1]
            encoder_box.weight.zero_()
            encoder_box.bias.fill_(-1e4)
            for head in box_heads:  # one shared head
                head.layers[-1].bias.fill_(-math.log(DINO_EPS) / len(box_heads))


@pytest.mark.parametrize("family", FAMILIES)
def test_drawn_png_and_class_names_from_checkpoint(tmp_path, family):
    ckpt, _, _ = _checkpoint(
        tmp_path, *_family_flags(family), "--num_classes", "3", plant=_plant_center_box,
        class_names=["background", "cat", "dog"],
    )  # fmt: skip
    score = math.exp(2) / (math.exp(2) + 3) if family == "detr" else 1 / (1 + math.exp(-2))
    paths = _images(tmp_path / "gray", color=(128, 128, 128))
    out = tmp_path / "out"
    results = predict.main(
        [
            str(paths[0]),
            "--checkpoint",
            str(ckpt),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            "--threshold",
            "0.7",
            "--no_progress",
        ]
    )
    assert len(results) == 10 and {r["category_name"] for r in results} == {"cat"}
    assert [r["score"] for r in results] == pytest.approx([score] * 10, abs=1e-6)
    width, height = SIZES[0]
    for result in results:
        assert result["bbox"] == pytest.approx([width / 4, height / 4, width / 2, height / 2], abs=1e-3)
    with Image.open(out / "img0.png") as drawn:
        pixels = drawn.convert("RGB")
        # The box's left edge (x = 16, mid-height; drawn at the whole pixel below, so 15 for DINO's 15.999998)
        # carries the class-1 colour; the box centre stays gray.
        assert pixels.getpixel((int(results[0]["bbox"][0]), height // 2)) == (0, 255, 0)
        assert pixels.getpixel((width // 2, height // 2 + 4)) == (128, 128, 128)

    # Above every score: nothing kept.
    results = predict.main(
        [
            str(paths[0]),
            "--checkpoint",
            str(ckpt),
            "--output_dir",
            str(tmp_path / "none"),
            "--device",
            "cpu",
            "--threshold",
            f"{score + 0.01}",
            "--no_progress",
        ]
    )
    assert results == []


def test_published_style_checkpoint_rebuilds(tmp_path):
    """Published files store an argparse.Namespace without this project's flags; shapes decide the rest."""
    args = parse_tiny_args("--num_queries", "7", "--position_embedding", "learned", "--pre_norm")
    model = build_model(args)[0]
    published = argparse.Namespace(
        **{
            k: v
            for k, v in vars(args).items()
            if k not in ("backbone_weights", "attention", "num_classes", "input_scale")
        }
    )
    published.hidden_dim = 999  # a wrong stored value: the state dict wins
    path = tmp_path / "published.pth"
    torch.save({"model": model.state_dict(), "args": published}, path)
    loaded, _, margs, _ = load_model(str(path))
    assert (margs.num_queries, margs.hidden_dim, margs.pre_norm, margs.position_embedding) == (7, 32, True, "learned")
    assert margs.backbone_weights == "none" and margs.num_classes == 91
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_published_style_deformable_checkpoint_rebuilds_its_family(tmp_path):
    """A published Deformable DETR file: a Namespace without --model; the keys tell the family and the switches."""
    flags = ("--model", "deformable_detr", "--with_box_refine", "--two_stage", "--num_feature_levels", "2")
    args = parse_tiny_args(*flags[:-2], "--num_feature_levels", "3", "--num_queries", "7", "--num_classes", "5")
    model = build_model(args)[0]
    published = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("model", "backbone_weights")})
    published.with_box_refine = published.two_stage = False  # wrong stored values: the state dict wins
    path = tmp_path / "r50_deformable_detr_two_stage.pth"
    torch.save({"model": model.state_dict(), "args": published}, path)
    loaded, postprocessors, margs, _ = load_model(str(path))
    assert (margs.model, margs.with_box_refine, margs.two_stage, margs.num_feature_levels) == (
        "deformable_detr", True, True, 3
    )  # fmt: skip
    assert (margs.num_classes, margs.num_queries, margs.hidden_dim) == (5, 7, 32)
    assert type(postprocessors["bbox"]).__name__ == "PostProcessTopK"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_published_style_dino_checkpoint_rebuilds_its_family(tmp_path):
    """A published DINO file: a Namespace with the published 'modelname' and no --model; keys give the rest."""
    flags = ("--num_feature_levels", "3", "--num_queries", "7", "--num_classes", "5", "--dn_labelbook_size", "8")
    args = parse_tiny_args(*FAMILY_FLAGS["dino"], *flags)
    model = build_model(args)[0]
    published = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("model", "backbone_weights")})
    published.modelname = "dino"
    published.num_queries = published.dn_labelbook_size = 999  # wrong stored values: the state dict wins
    path = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": model.state_dict(), "args": published}, path)
    loaded, postprocessors, margs, _ = load_model(str(path))
    assert (margs.model, margs.num_queries, margs.dn_labelbook_size, margs.num_classes) == ("dino", 7, 8, 5)
    assert postprocessors["bbox"].num_select == 20  # the stored --num_select
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_class_name_resolution(tmp_path):
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"categories": [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"}]}))
    assert resolve_class_names(None, 3, str(cats)) == {1: "widget", 2: "gadget"}
    assert resolve_class_names({"categories": {"1": "a"}}, 3) == {1: "a"}
    assert resolve_class_names(None, 91)[1] == "person" and len(COCO_CLASSES) == 91
    assert sum(name != "N/A" for name in COCO_CLASSES) == 80
    assert resolve_class_names(None, 5) == {}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: category entry 0"):
        resolve_class_names(None, 3, str(bad))


def test_bad_inputs_give_one_line_errors(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="nothing_here.*no image file"):
        predict.main([str(tmp_path / "nothing_here"), "--checkpoint", str(ckpt)])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="broken.jpg: cannot read the image"):
        predict.main(
            [
                str(broken),
                "--checkpoint",
                str(ckpt),
                "--device",
                "cpu",
                "--output_dir",
                str(tmp_path / "o"),
                "--no_progress",
            ]
        )
    with pytest.raises(SystemExit, match="missing.pth"):
        predict.main([str(broken), "--checkpoint", str(tmp_path / "missing.pth")])


def _favour_non_categories(model):
    """Class logits +3 for ids 0, 2 and 4 (not categories below), so unmasked they win every top-k slot."""
    heads = model.class_embed if isinstance(model.class_embed, torch.nn.ModuleList) else [model.class_embed]
    with torch.no_grad():
        for head in heads:
            head.bias[[0, 2, 4]] += 3.0


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_checkpoints_categories_are_reported(tmp_path, family):
    """Issue 18 item 4: 5 classes, categories 1 and 3 only; no other id is ever written or drawn."""
    ckpt, model, args = _checkpoint(
        tmp_path, *_family_flags(family), "--num_classes", "5", plant=_favour_non_categories,
        class_names={1: "cat", 3: "dog"},
    )  # fmt: skip
    paths = _images(tmp_path / "images")
    argv = [str(paths[0]), "--checkpoint", str(ckpt), "--device", "cpu", "--no_progress", "--threshold", "0.0"]
    results = predict.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert {r["category_id"] for r in results} <= {1, 3}
    assert {r["category_name"] for r in results} <= {"cat", "dog"}
    if family == "detr":
        return  # softmax: a query whose best class is not a category is dropped (checked above)
    # Oracle: the top-k (query, class) pairs among the categories only, by sigmoid score.
    with torch.no_grad():
        image = Image.open(paths[0]).convert("RGB")
        logits = model(nested_tensor_from_tensor_list([predict.eval_transform(image, 0.1)]))["pred_logits"][0]
    pairs = sorted(((float(logits[q, c].sigmoid()), q, c) for q in range(len(logits)) for c in (1, 3)), reverse=True)
    expected = pairs[: TOP_K[family]]
    assert len(results) == len(expected) == min(TOP_K[family], 2 * args.num_queries)
    assert [(r["category_id"], r["score"]) for r in results] == [
        (c, pytest.approx(s, abs=1e-6)) for s, _, c in expected
    ]

    # A published file names no categories: every id stays, and names are not invented for them.
    published = tmp_path / "published.pth"
    torch.save({"model": model.state_dict(), "args": args}, published)
    argv[2] = str(published)
    results = predict.main([*argv, "--output_dir", str(tmp_path / "pub")])
    assert {r["category_id"] for r in results} >= {0, 2, 4}
    assert {r["category_name"] for r in results} <= {f"class {i}" for i in range(5)}


def test_categories_that_name_no_class_of_the_model_are_one_line(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path, "--num_classes", "3")
    cats = tmp_path / "other.json"
    cats.write_text(json.dumps([{"id": 7, "name": "truck"}, {"id": 9, "name": "bus"}]))
    argv = [str(_images(tmp_path / "i")[0]), "--checkpoint", str(ckpt), "--device", "cpu", "--categories", str(cats)]
    with pytest.raises(SystemExit) as info:
        predict.main([*argv, "--output_dir", str(tmp_path / "o"), "--no_progress"])
    assert str(info.value.code) == f"error: {cats}: no category id (7..9) is a class of this model (0..2)"


def test_threshold_help_explains_the_score_per_family():
    text = " ".join(predict.get_args_parser().format_help().split())
    assert (
        "softmax probability of its best class" in text and "top --num_select (query, class) pairs by sigmoid" in text
    )
    assert "Only the checkpoint's categories" in text
