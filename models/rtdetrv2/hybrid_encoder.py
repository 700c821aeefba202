"""RT-DETR's efficient hybrid encoder (Zhao et al. 2024, section 4.2): AIFI + CCFF.

AIFI (attention-based intra-scale feature interaction) runs one post-norm transformer encoder layer on the
coarsest level only (stride 32, where the tokens are few and semantic); CCFF (CNN-based cross-scale feature
fusion) is a PAN-style top-down then bottom-up path of convolutions and CSP blocks over the three levels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.deploy import fold_conv_norm
from models.presnet import ConvNormLayer
from models.transformer_layers import TransformerEncoderLayer

__all__ = ["CSPRepLayer", "HybridEncoder", "RepVggBlock", "aifi_layer", "sincos_2d_position_embedding"]


def sincos_2d_position_embedding(width: int, height: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine table [1, W * H, dim] in the published layout.

    With D = dim / 4 and omega_k = temperature^(-k / D), sequence position i gets a = i // H and b = i % H
    (a meshgrid over (arange(W), arange(H)) with 'ij' indexing, flattened) and the channels
    [sin(a omega), cos(a omega), sin(b omega), cos(b omega)]. For the row-major tokens of a square map
    (i = y * W + x) that is a = y, b = x; for a non-square map the published index arithmetic is kept (a quirk:
    a and b are then not the token's row and column).
    """
    if dim % 4:
        raise ValueError(f"sincos position embedding: dim must be divisible by 4, got {dim}")
    grid_a, grid_b = torch.meshgrid(
        torch.arange(int(width), dtype=torch.float32), torch.arange(int(height), dtype=torch.float32), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_a = grid_a.flatten()[:, None] @ omega[None]
    out_b = grid_b.flatten()[:, None] @ omega[None]
    return torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)[None]


def aifi_layer(d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0) -> TransformerEncoderLayer:
    """The AIFI layer: the shared post-norm encoder layer (q = k = src + pos, v = src) with a GELU feed-forward.

    Keys ``self_attn.in_proj_*``, ``self_attn.out_proj.*``, ``linear1``, ``linear2``, ``norm1``, ``norm2``.
    """
    return TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation="gelu")


class _AIFIEncoder(nn.Module):
    """Stack of AIFI layers (keys ``layers.{i}``; no final norm)."""

    def __init__(self, layers: Sequence[TransformerEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        """[B, N, C] tokens (no padding), [1, N, C] position table -> [B, N, C]."""
        for layer in self.layers:
            src = layer(src, None, pos)
        return src


class RepVggBlock(nn.Module):
    """SiLU(3x3 conv + BN  +  1x1 conv + BN) (RepVGG's training-time form; keys ``conv1``, ``conv2``).

    ``fuse_for_inference()`` turns it into SiLU(one biased 3x3 conv) (RepVGG's structural re-parameterisation,
    Ding et al. 2021, section 3.3), for inference copies only (models.deploy).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3, 1)
        self.conv2 = ConvNormLayer(channels, channels, 1, 1)
        self.fused: nn.Conv2d | None = None

    @torch.no_grad()
    def fuse_for_inference(self) -> None:
        """Replace both branches by one 3x3 conv (eval-mode BN statistics; removes ``conv1``/``conv2``).

        Both branches are linear in x after folding their norms: W3 * x + b3 and W1 * x + b1. A 1x1 kernel is the
        3x3 kernel that is zero except at its centre, and with padding 1 vs 0 both read the same input pixel
        there, so the sum is one 3x3 conv with weight W3 + pad(W1) and bias b3 + b1.
        """
        if self.fused is not None:
            return
        weight3, bias3 = fold_conv_norm(self.conv1.conv, self.conv1.norm)
        weight1, bias1 = fold_conv_norm(self.conv2.conv, self.conv2.norm)
        conv = self.conv1.conv
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, padding=1, bias=True)
        fused.to(device=weight3.device, dtype=weight3.dtype)
        fused.weight.copy_(weight3 + F.pad(weight1, [1, 1, 1, 1]))
        fused.bias.copy_(bias3 + bias1)
        del self.conv1, self.conv2
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        if self.fused is not None:  # inference only: the conv's fresh output may be overwritten
            return F.silu(self.fused(x), inplace=True)
        return F.silu(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """CSP block: conv3(bottlenecks(conv1 x) + conv2 x), hidden c = int(out * expansion).

    ``conv3`` (1x1 c -> out + BN + SiLU) exists only when c != out; otherwise it is the identity (no keys).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, act=nn.SiLU())
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, act=nn.SiLU())
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden) for _ in range(num_blocks)])
        self.conv3 = (
            ConvNormLayer(hidden, out_channels, 1, 1, act=nn.SiLU()) if hidden != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, H, W] -> [B, out, H, W]."""
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class HybridEncoder(nn.Module):
    """Project three backbone levels to ``hidden_dim``, run AIFI on the last, fuse them with CCFF.

    Args:
        in_channels: backbone channels of the three levels (strides 8/16/32).
        hidden_dim: H, the encoder width (enc_hidden_dim).
        nhead, dim_feedforward, num_layers, dropout: the AIFI layer(s).
        expansion: CSPRepLayer hidden fraction (enc_expansion).
        eval_spatial_size: (H, W) of eval inputs; its AIFI position table becomes the buffer ``pos_embed2``
            (not saved). None: always computed.
        pe_temperature: of the sine-cosine table.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024, 2048),
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        num_layers: int = 1,
        dropout: float = 0.0,
        expansion: float = 1.0,
        eval_spatial_size: tuple[int, int] | None = (640, 640),
        pe_temperature: float = 10000.0,
    ):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"HybridEncoder: expected 3 input levels (strides 8/16/32), got {len(in_channels)}")
        self.hidden_dim, self.pe_temperature = hidden_dim, pe_temperature
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict([("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)), ("norm", nn.BatchNorm2d(hidden_dim))])
            )
            for c in in_channels
        )
        layers = [aifi_layer(hidden_dim, nhead, dim_feedforward, dropout) for _ in range(num_layers)]
        # One encoder, for level 2 (the published use_encoder_idx [2]); hence the name pos_embed2.
        self.encoder = nn.ModuleList([_AIFIEncoder(layers)])
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=nn.SiLU()) for _ in range(2))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, 3, expansion) for _ in range(2))
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=nn.SiLU()) for _ in range(2)
        )
        self.pan_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, 3, expansion) for _ in range(2))
        if eval_spatial_size is not None:
            height, width = eval_spatial_size[0] // 32, eval_spatial_size[1] // 32
            table = sincos_2d_position_embedding(width, height, hidden_dim, pe_temperature)
            self.register_buffer("pos_embed2", table, persistent=False)
        else:
            self.pos_embed2 = None

    def _position_table(self, height: int, width: int, device: torch.device) -> Tensor:
        table = self.pos_embed2
        if self.training or table is None or table.shape[1] != height * width:
            # Training (multi-scale) and other eval sizes: built for this input, as published in training.
            table = sincos_2d_position_embedding(width, height, self.hidden_dim, self.pe_temperature)
        return table.to(device)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Three maps [B, C_l, H_l, W_l] (strides 8/16/32) -> three [B, H, H_l, W_l] fused maps."""
        if len(feats) != 3:
            raise ValueError(f"HybridEncoder: expected 3 feature maps, got {len(feats)}")
        proj = [layer(feat) for layer, feat in zip(self.input_proj, feats)]
        batch, _, height, width = proj[2].shape
        tokens = proj[2].flatten(2).transpose(1, 2)  # row-major: token i = y * W + x
        memory = self.encoder[0](tokens, self._position_table(height, width, tokens.device))
        proj[2] = memory.transpose(1, 2).reshape(batch, self.hidden_dim, height, width).contiguous()

        # Top-down: the lateral conv's output replaces the coarser map that it was applied to.
        inner = [proj[2]]
        for k, level in enumerate((1, 0)):
            high = self.lateral_convs[k](inner[0])
            inner[0] = high
            upsampled = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.fpn_blocks[k](torch.cat([upsampled, proj[level]], dim=1)))
        # Bottom-up.
        outs = [inner[0]]
        for k in range(2):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs
