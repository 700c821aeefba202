"""Attention capture equals a hand computation from the layer inputs; the figures are written."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import parse_tiny_args
from PIL import Image

import predict
from models import build_model
from run.checkpoint import save_checkpoint
from tools.visualize_attention import capture_attention, parse_points, save_attention_maps, select_objects


def _head_averaged_attention(module, query, key, key_padding_mask=None):
    """softmax(q k^T / sqrt(d)) per head from the fused in-projection, averaged over heads: [B, Lq, Lk]."""
    dim, heads = module.embed_dim, module.num_heads
    q = torch.nn.functional.linear(query, module.in_proj_weight[:dim], module.in_proj_bias[:dim])
    k = torch.nn.functional.linear(key, module.in_proj_weight[dim : 2 * dim], module.in_proj_bias[dim : 2 * dim])
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(batch, lq, heads, -1).transpose(1, 2)
    k = k.view(batch, lk, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)


@pytest.fixture
def tiny_model():
    args = parse_tiny_args("--enc_layers", "2")
    model = build_model(args)[0].eval()
    return model, args


def test_captured_maps_equal_hand_computed_attention(tiny_model):
    model, _ = tiny_model
    image = torch.randn(3, 96, 128)
    inputs = {}

    def keep_inputs(name):
        def hook(_module, args, kwargs):
            inputs[name] = (args, kwargs)

        return hook

    decoder_attn = model.transformer.decoder.layers[-1].multihead_attn
    encoder_attn = model.transformer.encoder.layers[-1].self_attn
    handles = [
        decoder_attn.register_forward_pre_hook(keep_inputs("decoder"), with_kwargs=True),
        encoder_attn.register_forward_pre_hook(keep_inputs("encoder"), with_kwargs=True),
    ]
    maps = capture_attention(model, image)
    for handle in handles:
        handle.remove()

    height, width = math.ceil(96 / 32), math.ceil(128 / 32)
    assert maps.decoder.shape == (10, height, width)
    assert maps.encoder.shape == (height, width, height, width)
    with torch.no_grad():
        dec_args, _ = inputs["decoder"]
        expected_dec = _head_averaged_attention(decoder_attn, dec_args[0], dec_args[1])[0]
        enc_args, _ = inputs["encoder"]
        expected_enc = _head_averaged_attention(encoder_attn, enc_args[0], enc_args[1])[0]
    torch.testing.assert_close(maps.decoder.reshape(10, -1), expected_dec, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.encoder.reshape(height * width, -1), expected_enc, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.decoder.sum((1, 2)), torch.ones(10))

    # Capturing switches to the math kernel only temporarily and does not change the predictions.
    kernels = {m.kernel for m in model.modules() if hasattr(m, "in_proj_weight")}
    assert kernels == {"sdpa"}
    with torch.no_grad():
        plain = model(image[None])
    torch.testing.assert_close(maps.outputs["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.outputs["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_select_objects_and_points():
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 2, 1] = 5.0  # query 2: class 1, confident
    logits[0, 0, 2] = 2.0  # query 0: class 2, weaker
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1, 1]]])
    chosen = select_objects({"pred_logits": logits, "pred_boxes": boxes}, (100, 200), threshold=0.5, max_objects=5)
    assert [(q, label) for q, label, _, _ in chosen] == [(2, 1), (0, 2)]
    assert chosen[0][3] == pytest.approx([0.0, 0.0, 100.0, 100.0])
    only_best = select_objects({"pred_logits": logits, "pred_boxes": boxes}, (100, 200), threshold=0.999, max_objects=5)
    assert [q for q, *_ in only_best] == [2]
    assert parse_points(["10,20", "3.5,4"]) == [(10.0, 20.0), (3.5, 4.0)]
    with pytest.raises(ValueError, match="expected X,Y"):
        parse_points(["10;20"])


def test_attention_pngs_from_function_and_predict_flag(tiny_model, tmp_path):
    model, args = tiny_model
    image = Image.fromarray(torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8).numpy())
    out = save_attention_maps(
        model, image, tmp_path / "a" / "attn.png", threshold=0.0, input_scale=0.1, points=["5,5", "70,50"]
    )
    assert out.is_file() and out.stat().st_size > 5000
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 300

    args.input_scale = 0.1
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, tmp_path / "ckpt.pth")
    image.save(tmp_path / "photo.png")
    predict.main(
        [
            str(tmp_path / "photo.png"),
            "--checkpoint",
            str(tmp_path / "ckpt.pth"),
            "--device",
            "cpu",
            "--output_dir",
            str(tmp_path / "pred"),
            "--attention_maps",
            "--threshold",
            "0.0",
            "--no_progress",
        ]
    )
    assert (tmp_path / "pred" / "photo_attention.png").stat().st_size > 5000
    assert (tmp_path / "pred" / "photo.png").is_file()


def test_select_objects_of_a_focal_model_uses_sigmoid_scores_and_only_categories():
    """Deformable DETR / DINO: no "no object" column, sigmoid per class; non-category ids are never chosen."""
    logits = torch.full((1, 3, 4), -6.0)
    logits[0, 0, 3] = 1.0  # query 0: class 3 (the last column, which a softmax[:-1] would drop)
    logits[0, 1, 0] = 4.0  # query 1: class 0, not a category below
    logits[0, 1, 2] = 0.5
    boxes = torch.full((1, 3, 4), 0.5)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    chosen = select_objects(outputs, (10, 10), threshold=0.3, max_objects=5, focal=True)
    assert [(q, label) for q, label, _, _ in chosen] == [(1, 0), (0, 3)]
    assert chosen[0][2] == pytest.approx(1 / (1 + math.exp(-4.0)))
    chosen = select_objects(outputs, (10, 10), threshold=0.3, max_objects=5, focal=True, class_ids=[2, 3])
    assert [(q, label) for q, label, _, _ in chosen] == [(0, 3), (1, 2)]
    assert chosen[1][2] == pytest.approx(1 / (1 + math.exp(-0.5)))
