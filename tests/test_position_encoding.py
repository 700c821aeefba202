"""Position encodings: shapes, channel order, interleaved sin/cos, padding, learned layout."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import parse_tiny_args

import models
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding
from util.misc import NestedTensor


def _nested(height: int, width: int, valid_hw: list[tuple[int, int]]) -> NestedTensor:
    mask = torch.ones(len(valid_hw), height, width, dtype=torch.bool)
    for m, (h, w) in zip(mask, valid_hw):
        m[:h, :w] = False
    return NestedTensor(torch.zeros(len(valid_hw), 7, height, width), mask)


def _expected_sine(pos: float, num_feats: int, temperature: float = 10000) -> list[float]:
    """Independent formula: channel 2i = sin(pos / T^(2i/F)), channel 2i+1 = cos of the same angle."""
    values = []
    for i in range(num_feats // 2):
        angle = pos / temperature ** (2 * i / num_feats)
        values += [math.sin(angle), math.cos(angle)]
    return values


def test_sine_shape_order_and_values():
    feats = 8
    enc = PositionEmbeddingSine(feats, normalize=True)
    height, width = 3, 5
    pos = enc(_nested(height, width, [(height, width)]))
    assert pos.shape == (1, 2 * feats, height, width) and pos.dtype == torch.float32
    for y in range(height):
        for x in range(width):
            y_pos = (y + 1) / (height + 1e-6) * 2 * math.pi
            x_pos = (x + 1) / (width + 1e-6) * 2 * math.pi
            expected = torch.tensor(_expected_sine(y_pos, feats) + _expected_sine(x_pos, feats))
            torch.testing.assert_close(pos[0, :, y, x], expected, atol=1e-5, rtol=1e-5)
    # y first: the first half is constant along x, the second half constant along y
    assert torch.allclose(pos[:, :feats], pos[:, :feats, :, :1].expand_as(pos[:, :feats]))
    assert torch.allclose(pos[:, feats:], pos[:, feats:, :1, :].expand_as(pos[:, feats:]))


def test_sine_unnormalized_uses_pixel_counts_and_custom_temperature():
    enc = PositionEmbeddingSine(4, temperature=20)
    pos = enc(_nested(2, 3, [(2, 3)]))
    torch.testing.assert_close(pos[0, :4, 1, 2], torch.tensor(_expected_sine(2.0, 4, 20)))
    torch.testing.assert_close(pos[0, 4:, 1, 2], torch.tensor(_expected_sine(3.0, 4, 20)))


def test_sine_padding_leaves_valid_pixels_as_in_the_unpadded_image():
    enc = PositionEmbeddingSine(16, normalize=True)
    batch = enc(_nested(6, 9, [(6, 9), (4, 5)]))
    alone = enc(_nested(4, 5, [(4, 5)]))
    torch.testing.assert_close(batch[1, :, :4, :5], alone[0])
    assert not torch.allclose(batch[0, :, :4, :5], alone[0])  # the full-size image is normalised differently
    assert torch.isfinite(batch).all()


def test_sine_rejects_scale_without_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(8, scale=1.0)


def test_learned_layout_x_first_then_y():
    enc = PositionEmbeddingLearned(6)
    pos = enc(_nested(3, 4, [(3, 4), (2, 2)]))
    assert pos.shape == (2, 12, 3, 4)
    for y in range(3):
        for x in range(4):
            torch.testing.assert_close(pos[1, :6, y, x], enc.col_embed.weight[x])
            torch.testing.assert_close(pos[1, 6:, y, x], enc.row_embed.weight[y])
    assert enc.row_embed.weight.min() >= 0 and enc.row_embed.weight.max() <= 1  # uniform init
    with pytest.raises(ValueError, match="50x50"):
        enc(_nested(51, 4, [(51, 4)]))


def test_build_position_encoding_of_kind_and_width():
    sine = build_position_encoding("sine", 32)
    assert isinstance(sine, PositionEmbeddingSine) and sine.normalize and sine.num_pos_feats == 16
    assert (sine.temperature, sine.temperature_w, sine.offset, sine.scale) == (10000, 10000, 0.0, 2 * math.pi)
    learned = build_position_encoding("learned", 32)
    assert isinstance(learned, PositionEmbeddingLearned) and learned.row_embed.weight.shape == (50, 16)
    with pytest.raises(ValueError, match="--position_embedding fourier"):
        build_position_encoding("fourier", 32)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--model", "detr"), (10000, 10000, 0.0, 2 * math.pi)),
        (("--model", "deformable_detr", "--position_embedding_scale", "3"), (10000, 10000, -0.5, 3.0)),
        (("--model", "dino", "--pe_temperatureH", "30", "--dn_number", "4"), (30, 20, 0.0, 2 * math.pi)),
    ],
)
def test_each_family_passes_its_published_sine_choices(flags, expected):
    encoding = models.build_model(parse_tiny_args(*flags))[0].backbone[1]
    assert (encoding.temperature, encoding.temperature_w, encoding.offset, encoding.scale) == expected
