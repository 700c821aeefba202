"""The shared encoder layer (models.transformer_layers): DETR's ReLU layer and RT-DETRv2's GELU AIFI layer against
references written with torch.nn.MultiheadAttention (the former AIFI implementation among them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILY_FLAGS, parse_tiny_args
from torch import nn

import models.detr.transformer
from models import build_model
from models.rtdetrv2.hybrid_encoder import HybridEncoder, aifi_layer
from models.transformer_layers import TransformerEncoderLayer

D, HEADS, FFN, N = 16, 4, 24, 7


class FormerAIFILayer(nn.Module):
    """RT-DETRv2's AIFI layer as it was before the shared layer: nn.MultiheadAttention, post-norm, GELU."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, need_weights=False)[0])
        return self.norm2(src + self.linear2(F.gelu(self.linear1(src))))


def reference(layer: TransformerEncoderLayer, src, mask, pos, activation: str, pre_norm: bool) -> torch.Tensor:
    """The layer's equations with torch's own attention and the layer's weights (eval, no dropout)."""
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    mha.load_state_dict(layer.self_attn.state_dict())
    act = {"relu": F.relu, "gelu": F.gelu}[activation]

    def ffn(x):
        return layer.linear2(act(layer.linear1(x)))

    def attend(x):
        q = x if pos is None else x + pos
        return mha(q, q, x, key_padding_mask=mask, need_weights=False)[0]

    if pre_norm:
        src = src + attend(layer.norm1(src))
        return src + ffn(layer.norm2(src))
    src = layer.norm1(src + attend(src))
    return layer.norm2(src + ffn(src))


def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights everywhere (LayerNorm too), so every parameter shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("kernel", ["sdpa", "math"])
def test_layer_matches_torch_reference(activation, pre_norm, kernel):
    layer = TransformerEncoderLayer(
        D, HEADS, FFN, dropout=0.0, normalize_before=pre_norm, attention=kernel, activation=activation
    )
    _randomise(layer.eval(), 0)
    g = torch.Generator().manual_seed(1)
    src, pos = torch.randn(2, N, D, generator=g), torch.randn(2, N, D, generator=g)
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[1, -3:] = True  # the second sequence is padded
    with torch.no_grad():
        for m, p in ((mask, pos), (None, pos[:1]), (None, None)):
            got = layer(src, m, p)
            expected = reference(layer, src, m, p, activation, pre_norm)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_activation_changes_the_output_and_bad_names_are_refused():
    relu = TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0).eval()
    gelu = TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, activation="gelu").eval()
    assert relu.activation == "relu"  # DETR's default
    _randomise(relu, 0)
    gelu.load_state_dict(relu.state_dict())
    src = torch.randn(1, N, D)
    with torch.no_grad():
        assert (relu(src) - gelu(src)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="activation 'swish': expected one of"):
        TransformerEncoderLayer(D, HEADS, FFN, activation="swish")


def test_aifi_layer_equals_the_former_implementation():
    new = aifi_layer(D, HEADS, FFN).eval()
    old = FormerAIFILayer(D, HEADS, FFN).eval()
    _randomise(old, 2)
    new.load_state_dict(old.state_dict(), strict=True)  # the same keys, both ways
    assert sorted(new.state_dict()) == sorted(old.state_dict())
    assert new.activation == "gelu" and not new.normalize_before
    g = torch.Generator().manual_seed(3)
    src, pos = torch.randn(2, N, D, generator=g), torch.randn(1, N, D, generator=g)  # one table for the batch
    with torch.no_grad():
        torch.testing.assert_close(new(src, None, pos), old(src, pos), rtol=0, atol=1e-6)


def test_hybrid_encoder_runs_the_former_aifi_layers():
    """The whole hybrid encoder with its AIFI layers swapped for the former ones gives the same maps."""
    encoder = HybridEncoder((8, 16, 32), hidden_dim=D, nhead=HEADS, dim_feedforward=FFN, num_layers=2).eval()
    _randomise(encoder, 4)
    layers = encoder.encoder[0].layers
    former = nn.ModuleList(FormerAIFILayer(D, HEADS, FFN) for _ in layers)
    former.load_state_dict(layers.state_dict(), strict=True)
    feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in ((8, 8), (16, 16), (32, 32))]
    with torch.no_grad():
        got = encoder(feats)
        encoder.encoder[0].forward = lambda src, pos: former[1](former[0](src, pos), pos)
        expected = encoder(feats)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_both_families_build_the_shared_layer():
    assert models.detr.transformer.TransformerEncoderLayer is TransformerEncoderLayer
    detr = build_model(parse_tiny_args(*FAMILY_FLAGS["detr"]))[0]
    rtdetr = build_model(parse_tiny_args(*FAMILY_FLAGS["rtdetrv2"]))[0]
    found = {
        name: [m.activation for m in model.modules() if isinstance(m, TransformerEncoderLayer)]
        for name, model in (("detr", detr), ("rtdetrv2", rtdetr))
    }
    assert found == {"detr": ["relu"], "rtdetrv2": ["gelu"]}  # one encoder layer each in the tiny models
