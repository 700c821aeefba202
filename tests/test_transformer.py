"""Transformer: SDPA vs reference math vs torch.nn.MultiheadAttention, layer semantics, padding, norms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import MultiheadAttention, set_attention_kernel
from models.detr.transformer import Transformer, TransformerDecoderLayer, TransformerEncoderLayer

D, HEADS = 16, 4


def _padding_mask(batch: int, length: int, valid: list[int]) -> torch.Tensor:
    return torch.arange(length)[None].expand(batch, -1) >= torch.tensor(valid)[:, None]


def _torch_mha(ours: MultiheadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(D, HEADS, batch_first=True)
    ref.load_state_dict(ours.state_dict())  # same parameter names, one to one
    return ref.eval()


@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_kernels_match_each_other_and_torch(self_attention):
    attn = MultiheadAttention(D, HEADS).eval()
    nn.init.normal_(attn.in_proj_bias)
    nn.init.normal_(attn.out_proj.bias)
    query = torch.randn(3, 5, D)
    key = query if self_attention else torch.randn(3, 7, D)
    value = torch.randn(3, key.shape[1], D)
    mask = _padding_mask(3, key.shape[1], [key.shape[1], 2, 4])
    attn.kernel = "sdpa"
    fast, no_weights = attn(query, key, value, key_padding_mask=mask)
    attn.kernel = "math"
    ref, weights = attn(query, key, value, key_padding_mask=mask)
    assert no_weights is None
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    expected, expected_weights = _torch_mha(attn)(query, key, value, key_padding_mask=mask)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    assert weights[1, :, 2:].abs().max() == 0  # padded keys get no attention


def test_attention_reference_math_by_hand():
    attn = MultiheadAttention(D, HEADS, kernel="math").eval()
    x = torch.randn(1, 3, D)
    out, _ = attn(x, x, x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    heads = []
    for h in range(HEADS):
        sl = slice(h * D // HEADS, (h + 1) * D // HEADS)
        q, k, v = (x[0] @ w[sl].T + b[sl] for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
        heads.append(torch.softmax(q @ k.T / math.sqrt(D // HEADS), dim=-1) @ v)
    torch.testing.assert_close(out[0], attn.out_proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-5)


def test_attention_validates_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="attention"):
        MultiheadAttention(8, 2, kernel="flash")
    with pytest.raises(ValueError, match="dec_layers"):
        Transformer(d_model=8, nhead=2, num_decoder_layers=0)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_semantics_against_torch_attention(pre_norm):
    layer = TransformerEncoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, normalize_before=pre_norm).eval()
    src, pos = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = _padding_mask(2, 6, [6, 3])
    mha = _torch_mha(layer.self_attn)

    def ffn(x):
        return layer.linear2(F.relu(layer.linear1(x)))

    if pre_norm:
        x = layer.norm1(src)
        out = src + mha(x + pos, x + pos, x, key_padding_mask=mask)[0]  # position on q and k, never v
        expected = out + ffn(layer.norm2(out))
    else:
        out = layer.norm1(src + mha(src + pos, src + pos, src, key_padding_mask=mask)[0])
        expected = layer.norm2(out + ffn(out))
    torch.testing.assert_close(layer(src, mask, pos), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_layer_semantics_against_torch_attention(pre_norm):
    layer = TransformerDecoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, normalize_before=pre_norm).eval()
    tgt, query_pos = torch.randn(2, 4, D), torch.randn(2, 4, D)
    memory, pos = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = _padding_mask(2, 6, [6, 2])
    self_mha, cross_mha = _torch_mha(layer.self_attn), _torch_mha(layer.multihead_attn)

    def ffn(x):
        return layer.linear2(F.relu(layer.linear1(x)))

    if pre_norm:
        x = layer.norm1(tgt)
        t = tgt + self_mha(x + query_pos, x + query_pos, x)[0]
        x = layer.norm2(t)
        t = t + cross_mha(x + query_pos, memory + pos, memory, key_padding_mask=mask)[0]
        expected = t + ffn(layer.norm3(t))
    else:
        t = layer.norm1(tgt + self_mha(tgt + query_pos, tgt + query_pos, tgt)[0])
        t = layer.norm2(t + cross_mha(t + query_pos, memory + pos, memory, key_padding_mask=mask)[0])
        expected = layer.norm3(t + ffn(t))
    torch.testing.assert_close(layer(tgt, memory, mask, pos, query_pos), expected, atol=1e-5, rtol=1e-5)


def _inputs(batch=2, height=3, width=4):
    src, pos = torch.randn(batch, D, height, width), torch.randn(batch, D, height, width)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    return src, mask, torch.randn(5, D), pos


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_sdpa_equals_math_with_padding(pre_norm):
    model = Transformer(D, HEADS, 2, 3, 32, dropout=0.0, normalize_before=pre_norm, return_intermediate_dec=True)
    model.eval()
    inputs = _inputs()
    hs, memory = model(*inputs)
    assert hs.shape == (3, 2, 5, D) and memory.shape == (2, D, 3, 4)
    set_attention_kernel(model, "math")
    hs_ref, memory_ref = model(*inputs)
    torch.testing.assert_close(hs, hs_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory, memory_ref, atol=1e-5, rtol=1e-5)
    assert (model.encoder.norm is not None) == pre_norm


def test_padded_positions_do_not_influence_valid_outputs():
    model = Transformer(D, HEADS, 2, 2, 32, dropout=0.0, return_intermediate_dec=True).eval()
    src, mask, query, pos = _inputs()
    hs, memory = model(src, mask, query, pos)
    noisy_src, noisy_pos = src.clone(), pos.clone()
    noisy_src[1][:, mask[1]] = 100.0
    noisy_pos[1][:, mask[1]] = -50.0
    hs2, memory2 = model(noisy_src, mask, query, noisy_pos)
    torch.testing.assert_close(hs, hs2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory[:, :, ~mask[1]], memory2[:, :, ~mask[1]], atol=1e-5, rtol=1e-5)


def test_decoder_outputs_pass_through_final_norm():
    model = Transformer(D, HEADS, 1, 3, 32, dropout=0.0, return_intermediate_dec=True).eval()
    raw = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda module, args, output: raw.append(output))
    hs, _ = model(*_inputs())
    assert len(raw) == 3
    for i in range(3):
        torch.testing.assert_close(hs[i], model.decoder.norm(raw[i]))
    last_only = Transformer(D, HEADS, 1, 3, 32, dropout=0.0, return_intermediate_dec=False).eval()
    last_only.load_state_dict(model.state_dict())
    torch.testing.assert_close(last_only(*_inputs_seeded())[0][0], model(*_inputs_seeded())[0][-1])


def _inputs_seeded():
    torch.manual_seed(3)
    return _inputs()


def test_xavier_init_of_matrices_and_parameter_names():
    model = Transformer(64, 4, 1, 1, 128)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            bound = math.sqrt(6 / (p.shape[0] + p.shape[1]))
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound, name
    names = {n for n, _ in model.named_parameters()}
    assert {
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.in_proj_bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.multihead_attn.in_proj_weight",
        "decoder.layers.0.norm3.weight",
        "decoder.norm.bias",
    } <= names
    assert not any(n.startswith("encoder.norm") for n in names)
