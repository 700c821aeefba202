"""2D position encodings of a padded feature map (DETR paper, section 3.2 and appendix A.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from util.misc import NestedTensor

__all__ = ["PositionEmbeddingLearned", "PositionEmbeddingSine", "build_position_encoding"]


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of each pixel's (y, x) position among the non-padded pixels.

    Channels ``[0, F)`` encode y and ``[F, 2F)`` encode x; within each half, channel ``2i`` is
    ``sin(p / T^(2i/F))`` and ``2i + 1`` is ``cos`` of the same argument. With ``normalize`` the
    positions are divided by the image's valid extent, so they run over ``(0, scale]``.

    Args:
        num_pos_feats: F, features per axis (hidden_dim / 2).
        temperature: T.
        normalize: scale positions to ``(0, scale]`` per image.
        scale: defaults to 2*pi; only meaningful with ``normalize``.
        offset: subtracted from the cumulative positions before normalising (Deformable DETR: -0.5, so each
            cell is encoded at its centre).
        temperature_w: T along x when it differs from y's (DINO's PositionEmbeddingSineHW); default T.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
        offset: float = 0.0,
        temperature_w: float | None = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.temperature_w = temperature if temperature_w is None else temperature_w

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """NestedTensor([B, C, H, W], mask [B, H, W], True on padding) -> [B, 2F, H, W] float32."""
        x = tensor_list.tensors
        mask = tensor_list.mask
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[-2], x.shape[-1]), dtype=torch.bool, device=x.device)
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        exponent = 2 * torch.div(index, 2, rounding_mode="floor") / self.num_pos_feats
        pos_y = self._sin_cos(y_embed[..., None] / self.temperature**exponent)
        pos_x = self._sin_cos(x_embed[..., None] / self.temperature_w**exponent)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    @staticmethod
    def _sin_cos(angles: Tensor) -> Tensor:
        """[B, H, W, F] -> [B, H, W, F] with sin on even and cos on odd channels (interleaved)."""
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a column (x) and a row (y) embedding of 50 entries each.

    Output channels ``[0, F)`` are the x embedding and ``[F, 2F)`` the y embedding.
    """

    def __init__(self, num_pos_feats: int = 256, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """NestedTensor([B, C, H, W], ...) -> [B, 2F, H, W] (the padding mask is not used)."""
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(
                f"PositionEmbeddingLearned: feature map {h}x{w} exceeds the {limit}x{limit} learned positions; "
                "use smaller images or --position_embedding sine"
            )
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat((x_emb[None, :, :].expand(h, w, -1), y_emb[:, None, :].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)


def build_position_encoding(
    kind: str,
    hidden_dim: int,
    scale: float | None = None,
    offset: float = 0.0,
    temperature: float = 10000,
    temperature_w: float | None = None,
) -> nn.Module:
    """Position encoding with hidden_dim / 2 features per axis.

    Args:
        kind: 'sine' (normalised ``PositionEmbeddingSine``) or 'learned' (``PositionEmbeddingLearned``); 'v2' / 'v3'
            are the published aliases.
        hidden_dim: the transformer width D (the encoding has D channels).
        scale, offset, temperature, temperature_w: the sine encoding's (see ``PositionEmbeddingSine``); each
            family passes its published values.
    """
    num_pos_feats = hidden_dim // 2
    if kind in ("sine", "v2"):
        return PositionEmbeddingSine(num_pos_feats, temperature, True, scale, offset, temperature_w)
    if kind in ("learned", "v3"):
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"--position_embedding {kind}: expected 'sine' or 'learned'")
