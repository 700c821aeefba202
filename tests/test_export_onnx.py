"""ONNX export: onnxruntime equals PyTorch within 1e-4 on CPU, at the export size and (dynamic) another size."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args

from models import build_model
from run.checkpoint import save_checkpoint
from tools.export_onnx import compare_with_onnxruntime, export_onnx, main

TOLERANCE = 1e-4


def test_fixed_size_export_matches_pytorch(tmp_path):
    model = build_model(parse_tiny_args())[0].eval()
    path = export_onnx(model, tmp_path / "fixed.onnx", height=96, width=128)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["pred_logits", "pred_boxes"]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 128]

    images = torch.randn(1, 3, 96, 128)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)  # the plain model, independent of the export wrapper
    np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), atol=TOLERANCE, rtol=0)
    assert model.aux_loss is True  # restored after the export
    assert max(compare_with_onnxruntime(model, path, images).values()) < TOLERANCE
    padded = torch.zeros(1, 96, 128, dtype=torch.bool)
    padded[0, 50:] = True
    with pytest.raises(ValueError, match="without a mask input"):
        compare_with_onnxruntime(model, path, images, padded)


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """A tiny model exported by the CLI with dynamic sizes and the mask input, checked by --check."""
    tmp_path = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    args = parse_tiny_args()
    model = build_model(args)[0].eval()
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, tmp_path / "ckpt.pth")
    out = tmp_path / "dynamic.onnx"
    report = main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt.pth"),
            "--output",
            str(out),
            "--height",
            "96",
            "--width",
            "128",
            "--dynamic",
            "--with_mask",
            "--check",
        ]
    )
    yield model, out, report
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_dynamic_export_with_mask_from_checkpoint_cli(dynamic_export):
    model, out, report = dynamic_export
    assert set(report) == {f"{name} {size}" for name in ("pred_logits", "pred_boxes") for size in ("96x128", "72x160")}
    assert max(report.values()) < TOLERANCE

    # A third size, batch of two with a padded image: ONNX equals the model run on the NestedTensor batch.
    images = torch.randn(2, 3, 64, 192)
    mask = torch.zeros(2, 64, 192, dtype=torch.bool)
    mask[1, 40:, :] = True
    mask[1, :, 100:] = True
    diffs = compare_with_onnxruntime(model, out, images, mask)
    assert max(diffs.values()) < TOLERANCE


def test_padding_edge_on_a_sampled_feature_row(dynamic_export):
    model, out, _ = dynamic_export
    images = torch.randn(2, 3, 60, 138)
    mask = torch.zeros(2, 60, 138, dtype=torch.bool)
    mask[1, 30:, :] = True  # feature rows sample input rows 0 and 30
    assert max(compare_with_onnxruntime(model, out, images, mask).values()) < TOLERANCE


@pytest.mark.parametrize("backbone", [("--dilation",), ("--backbone_stages", "2")], ids=["dc5", "stages2"])
def test_export_of_the_demo_decoder_options(tmp_path, backbone):
    """--spatial_prior gaussian --box_refine with a dilated or a 2-stage backbone (the demo's model) export and
    match too."""
    torch.manual_seed(0)
    args = parse_tiny_args(*backbone, "--spatial_prior", "gaussian", "--box_refine", "--dec_layers", "3")
    model = build_model(args)[0].eval()
    path = export_onnx(model, tmp_path / "demo.onnx", height=96, width=128, dynamic=True, with_mask=True)
    images = torch.randn(2, 3, 80, 112)
    mask = torch.zeros(2, 80, 112, dtype=torch.bool)
    mask[1, :, 70:] = True  # the prior's cell centres depend on each image's unpadded size
    assert max(compare_with_onnxruntime(model, path, images, mask).values()) < TOLERANCE


def test_default_opsets_per_exporter(tmp_path):
    model = build_model(parse_tiny_args())[0].eval()
    path = export_onnx(model, tmp_path / "ts.onnx", height=64, width=64)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17
    with pytest.raises(ValueError, match="opset 18"):
        export_onnx(model, tmp_path / "bad.onnx", height=64, width=64, opset=17, exporter="dynamo")


def test_dynamo_exporter_default_writes_a_valid_dynamic_model(tmp_path):
    """The dynamo exporter at its default opset: a valid graph (full onnx check) that onnxruntime loads and that
    matches PyTorch at another size with padding. Skipped without onnxscript."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = build_model(parse_tiny_args())[0].eval()
    path = export_onnx(model, tmp_path / "dynamo.onnx", 96, 128, dynamic=True, with_mask=True, exporter="dynamo")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert [i.name for i in proto.graph.input] == ["images", "mask"]
    images = torch.randn(2, 3, 80, 112)
    mask = torch.zeros(2, 80, 112, dtype=torch.bool)
    mask[1, :, 70:] = True
    assert max(compare_with_onnxruntime(model, path, images, mask).values()) < TOLERANCE
    assert max(compare_with_onnxruntime(model, path, torch.randn(1, 3, 96, 128)).values()) < TOLERANCE


# ------------------------------------------------------------------------------------- Deformable DETR

DEFORMABLE_RECIPES = {  # tiny versions of the published recipes
    "single_scale": ("--num_feature_levels", "1"),
    "multi_scale": ("--num_feature_levels", "3"),
    "two_stage": ("--num_feature_levels", "3", "--with_box_refine", "--two_stage"),
}


def _deformable(*flags):
    torch.manual_seed(0)
    args = parse_tiny_args("--model", "deformable_detr", *flags)
    return build_model(args)[0].eval(), args


@pytest.mark.parametrize("recipe", list(DEFORMABLE_RECIPES))
def test_deformable_fixed_size_export_from_checkpoint_matches_pytorch(tmp_path, recipe):
    """The CLI rebuilds Deformable DETR from its checkpoint; the deformable attention exports through
    grid_sample (opset >= 16); onnxruntime equals PyTorch with and without padding."""
    model, args = _deformable(*DEFORMABLE_RECIPES[recipe])
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, tmp_path / "ckpt.pth")
    out = tmp_path / "deformable.onnx"
    flags = ["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(out), "--height", "96", "--width", "128"]
    report = main([*flags, "--with_mask", "--check"])
    assert max(report.values()) < TOLERANCE
    graph = onnx.load(str(out)).graph
    assert any(node.op_type == "GridSample" for node in graph.node)
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 10, 91]  # no "no object"
    images = torch.randn(1, 3, 96, 128)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    mask[0, :, 90:] = True  # a padded image of the export size
    assert max(compare_with_onnxruntime(model, out, images, mask).values()) < TOLERANCE
    assert model.aux_loss is True  # restored after the export


@pytest.mark.parametrize("recipe", list(DEFORMABLE_RECIPES))
def test_deformable_dynamic_export_matches_pytorch_at_other_sizes(tmp_path, recipe):
    model, _ = _deformable(*DEFORMABLE_RECIPES[recipe])
    path = export_onnx(model, tmp_path / "dynamic.onnx", height=96, width=128, dynamic=True, with_mask=True)
    for batch, height, width in ((1, 96, 128), (2, 80, 112), (2, 64, 192)):
        mask = torch.zeros(batch, height, width, dtype=torch.bool)
        mask[-1, :, width * 2 // 3 :] = True
        assert (
            max(compare_with_onnxruntime(model, path, torch.randn(batch, 3, height, width), mask).values()) < TOLERANCE
        )


# ------------------------------------------------------------------------------------- DINO

DINO_RECIPES = {  # tiny versions of the published 4-scale and 5-scale models
    "4scale": FAMILY_FLAGS["dino"],
    "5scale": (*FAMILY_FLAGS["dino"], "--num_feature_levels", "5", "--return_interm_indices", "0", "1", "2", "3"),
}


@pytest.mark.parametrize("recipe", list(DINO_RECIPES))
def test_dino_dynamic_export_from_checkpoint_matches_onnxruntime(tmp_path, recipe):
    """The CLI rebuilds DINO from its checkpoint and exports it with dynamic sizes and the mask input (top-k query
    selection included); onnxruntime equals PyTorch at the export size and at other padded sizes."""
    torch.manual_seed(0)
    args = parse_tiny_args(*DINO_RECIPES[recipe])
    model = build_model(args)[0].eval()
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, tmp_path / "ckpt.pth")
    out = tmp_path / "dino.onnx"
    flags = ["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(out), "--height", "96", "--width", "128"]
    report = main([*flags, "--dynamic", "--with_mask", "--check"])
    assert len(report) == 4 and max(report.values()) < TOLERANCE
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"GridSample", "TopK"} <= ops
    for batch, height, width in ((2, 80, 112), (1, 136, 72)):
        mask = torch.zeros(batch, height, width, dtype=torch.bool)
        mask[-1, height * 3 // 4 :, width // 2 :] = True
        diffs = compare_with_onnxruntime(model, out, torch.randn(batch, 3, height, width), mask)
        assert max(diffs.values()) < TOLERANCE, diffs


def test_dino_export_needs_as_many_encoder_tokens_as_queries(tmp_path):
    torch.manual_seed(0)
    model = build_model(parse_tiny_args(*FAMILY_FLAGS["dino"], "--num_queries", "300"))[0].eval()
    # 96 x 128: 12*16 + 6*8 + 3*4 + 2*2 = 256 tokens for 300 queries.
    with pytest.raises(ValueError, match="96x128: too few encoder tokens for the model's top-300 query selection"):
        export_onnx(model, tmp_path / "small.onnx", height=96, width=128)
