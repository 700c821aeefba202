"""Swin Transformer backbone with the published DINO configurations and state-dict layout.

The module itself is ``backbone.0`` of a DINO model (no ``body`` wrapper), so a published DINO Swin checkpoint
holds ``backbone.0.patch_embed.*``, ``backbone.0.layers.{i}.blocks.{j}.*``, ``backbone.0.layers.{i}.downsample.*``
(i < 3) and one output LayerNorm ``backbone.0.norm{i}.*`` per returned stage. Each attention keeps its learned
``relative_position_bias_table`` [(2w-1)^2, heads] and the persistent int64 ``relative_position_index`` buffer
[w^2, w^2], as the published files do.

Published detection behaviour reproduced here (Swin-Det / DINO, not the ImageNet classifier): the image is padded
right/bottom to a multiple of the patch size, every block pads its map to a multiple of the window after
``norm1`` (padded tokens are zeros that stay visible as keys), odd blocks always shift by ``w // 2`` with the
-100 additive mask even when the map is smaller than a window, and odd maps are padded before patch merging.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from util.misc import NestedTensor

from .feature_maps import downsample_mask_nearest
from .state_dict import read_weights_file

__all__ = [
    "SWIN_CONFIGS",
    "SwinConfig",
    "SwinTransformer",
    "build_swin_backbone",
    "load_swin_weights",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

log = logging.getLogger("detr")

# Value the published code adds to attention logits between tokens from different regions of a shifted window.
SHIFT_MASK_VALUE = -100.0


@dataclass(frozen=True)
class SwinConfig:
    """One Swin variant: channels ``embed_dim * 2**i`` and ``depths[i]`` blocks of ``num_heads[i]`` heads per stage."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    pretrain_img_size: int
    drop_path_rate: float = 0.2  # the published SwinTransformer default, which build_swin_transformer keeps
    patch_size: int = 4
    mlp_ratio: float = 4.0


# The published DINO names: swin_{size}_{pretraining resolution}_{ImageNet-1k or 22k}.
SWIN_CONFIGS: dict[str, SwinConfig] = {
    "swin_T_224_1k": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), window_size=7, pretrain_img_size=224),
    "swin_B_224_22k": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), window_size=7, pretrain_img_size=224),
    "swin_B_384_22k": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), window_size=12, pretrain_img_size=384),
    "swin_L_224_22k": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=7, pretrain_img_size=224),
    "swin_L_384_22k": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=12, pretrain_img_size=384),
}


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of w) -> [B * nW, w, w, C], windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: [B * nW, w, w, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """[w^2, w^2] int64: row of the bias table for query token i and key token j of a window (row-major tokens).

    The row is ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` with ``(dy, dx)`` = position of i minus position of j.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # [2, w^2]
    delta = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # [2, w^2, w^2], in [0, 2w - 2]
    return delta[0] * (2 * window_size - 1) + delta[1]


def shifted_window_mask(
    height: int, width: int, window_size: int, shift: int, device: torch.device | None = None
) -> Tensor:
    """Additive mask of the shifted windows of a padded [Hp, Wp] map: [nW, w^2, w^2], 0 or -100.

    After the cyclic shift by ``-shift`` a window at the bottom/right edge mixes tokens from up to three bands per
    axis (the map's interior, its last window minus the shift, the wrapped-around strip); tokens of different
    bands must not attend to each other.
    """
    region = torch.zeros((1, height, width, 1), device=device)
    bands = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    region = window_partition(region, window_size).reshape(-1, window_size * window_size)  # [nW, w^2]
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE)


class Mlp(nn.Module):
    """Token MLP ``fc1 -> GELU -> fc2`` (published names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """[heads, w^2, w^2]: the table looked up at every (query, key) pair."""
        n = self.window_size**2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B * nW, N, C] window tokens; mask: [nW, N, N] additive (0 / -100) or None -> [B * nW, N, C]."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B * nW, heads, N, d]
        bias = self.relative_position_bias()
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            nw = mask.shape[0]
            # Windows of one image share the mask: [B, nW, heads, N, d] broadcasts against [nW, heads, N, N].
            attn_mask = (bias[None] + mask[:, None]).to(q.dtype)
            q, k, v = (t.reshape(bw // nw, nw, self.num_heads, n, -1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).flatten(0, 1)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual and stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size}: must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, shift_mask: Tensor) -> Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]; ``shift_mask`` [nW, w^2, w^2] of the padded map (used if shifted)."""
        b, _, c = x.shape
        w, s = self.window_size, self.shift_size
        y = self.norm1(x).view(b, height, width, c)
        pad_b, pad_r = (w - height % w) % w, (w - width % w) % w
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(y, w).reshape(-1, w * w, c)
        windows = self.attn(windows, mask=shift_mask if s > 0 else None)
        y = window_reverse(windows.view(-1, w, w, c), w, hp, wp)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :height, :width].reshape(b, height * width, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (4C), LayerNorm, linear to 2C. Odd maps are zero-padded first."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """[B, H*W, C] -> [B, ceil(H/2) * ceil(W/2), 2C]."""
        b, _, c = x.shape
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
        # Published channel order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``layers.{i}``: ``blocks`` alternating plain / shifted windows, then an optional ``downsample``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ):
        super().__init__()
        self.window_size = window_size
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop_path[i]
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        """[B, H*W, C] -> (stage output [B, H*W, C], next stage input [B, H'*W', C'], H', W')."""
        w = self.window_size
        hp, wp = -(-height // w) * w, -(-width // w) * w
        shift_mask = shifted_window_mask(hp, wp, w, w // 2, device=x.device)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, height, width, shift_mask, use_reentrant=False)
            else:
                x = block(x, height, width, shift_mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """``patch_embed``: p x p stride-p convolution then LayerNorm; the image is zero-padded to multiples of p."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, ceil(H/p) * ceil(W/p), C] tokens (row-major)."""
        p = self.patch_size
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (p - w % p) % p, 0, (p - h % p) % p))
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Swin backbone returning the stages in ``out_indices`` (0 = stride 4 ... 3 = stride 32), each after its own
    LayerNorm ``norm{i}``, with the padding mask resized to every level.

    Attributes:
        num_channels / stage_channels: channels of each returned level (the published Joiner's list).
        strides: stride of each returned level.
        num_features: channels of all four stages.
        pretrain_img_size: ImageNet resolution of the matching published weights (informational: the published
            absolute position embedding that would use it is off in every DINO config).
    """

    def __init__(self, config: SwinConfig, out_indices: Sequence[int] = (1, 2, 3), use_checkpoint: bool = False):
        super().__init__()
        num_stages = len(config.depths)
        indices = sorted(set(out_indices))
        if not indices or indices[0] < 0 or indices[-1] >= num_stages or len(indices) != len(out_indices):
            raise ValueError(f"--return_interm_indices {list(out_indices)}: distinct stages in 0..{num_stages - 1}")
        self.out_indices = indices
        self.pretrain_img_size = config.pretrain_img_size
        self.num_features = [config.embed_dim * 2**i for i in range(num_stages)]
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        # Stochastic depth grows linearly over all blocks of all stages.
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            first = sum(config.depths[:i])
            self.layers.append(
                SwinStage(
                    self.num_features[i],
                    depth,
                    config.num_heads[i],
                    config.window_size,
                    config.mlp_ratio,
                    rates[first : first + depth],
                    downsample=i < num_stages - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
        for i in indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.num_channels = [self.num_features[i] for i in indices]
        self.stage_channels = list(self.num_channels)
        self.strides = [config.patch_size * 2**i for i in indices]

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> one [B, C_i, ceil(H / s_i), ceil(W / s_i)] map per returned stage (s_i = stride)."""
        p = self.patch_embed.patch_size
        height, width = -(-images.shape[-2] // p), -(-images.shape[-1] // p)
        x = self.patch_embed(images)
        outs = []
        # Stages after the last returned one are skipped: they cannot change the returned maps.
        for i, layer in enumerate(self.layers[: self.out_indices[-1] + 1]):
            stage_out, x, next_h, next_w = layer(x, height, width)
            if i in self.out_indices:
                stage_out = getattr(self, f"norm{i}")(stage_out)
                outs.append(stage_out.view(-1, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            height, width = next_h, next_w
        return outs

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        """[B, 3, H, W] images + [B, H, W] mask -> {'0'..: NestedTensor([B, C_i, H_i, W_i], [B, H_i, W_i])}."""
        images, mask = tensor_list.tensors, tensor_list.mask
        if mask is None:
            mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
        return {
            str(k): NestedTensor(feature, downsample_mask_nearest(mask, feature.shape[-2:]))
            for k, feature in enumerate(self.forward_features(images))
        }


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """A Swin state dict from ``path``: a bare dict, {'model': ...} (published ImageNet files) or a DINO checkpoint
    (keys under ``backbone.0.``); a DDP ``module.`` prefix is removed."""
    return read_weights_file(path, "'none' or a Swin .pth state dict", ("module.", "backbone.0."))


def _is_imagenet_only(key: str) -> bool:
    """Keys of a published ImageNet Swin file that the detection backbone has no use for: the classifier
    ``head.*`` (dropped by the published loader), the final ``norm.*`` (detection normalises each level with
    ``norm{i}`` instead) and the ``*.attn_mask`` buffers precomputed for the 224/384 classification resolution
    (detection recomputes them per input size). The published loader reports the last two as unexpected keys."""
    return key.startswith("head.") or key in ("norm.weight", "norm.bias") or key.endswith(".attn_mask")


def load_swin_weights(model: SwinTransformer, path: str, name: str = "swin") -> dict[str, list[str]]:
    """Load a published ImageNet Swin file (or a DINO checkpoint's backbone) into ``model`` in place.

    Every backbone key must be present with its shape, except the output norms ``norm{i}`` that ImageNet files
    lack (kept at their initialisation, as published); keys of :func:`_is_imagenet_only` are dropped; anything else
    is an error. Returns {'dropped': file keys not loaded, 'missing': model keys left at initialisation}.
    """
    state = _read_state_dict(path)
    dropped = sorted(k for k in state if _is_imagenet_only(k))
    state = {k: v for k, v in state.items() if not _is_imagenet_only(k)}
    own = model.state_dict()
    wrong_shape = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if wrong_shape:
        more = "..." if len(wrong_shape) > 1 else ""
        raise ValueError(
            f"--backbone_weights {path}: shapes differ from --backbone {name} ({wrong_shape[0]}{more}); "
            "is the file for another Swin size or window?"
        )
    unexpected = sorted(set(state) - set(own))
    output_norms = {f"norm{i}.{p}" for i in model.out_indices for p in ("weight", "bias")}
    missing = sorted(set(own) - set(state))
    if unexpected or set(missing) - output_norms:
        bad_missing = sorted(set(missing) - output_norms)
        more_missing, more_unexpected = ("..." if len(keys) > 3 else "" for keys in (bad_missing, unexpected))
        raise ValueError(
            f"--backbone_weights {path}: not a {name} state dict "
            f"(missing {bad_missing[:3]}{more_missing}, unexpected {unexpected[:3]}{more_unexpected})"
        )
    model.load_state_dict(state, strict=False)
    log.info(
        "loaded %s from %s; dropped %d ImageNet-only keys %s; kept initialised: %s",
        name,
        path,
        len(dropped),
        dropped[:4] + (["..."] if len(dropped) > 4 else []),
        missing,
    )
    return {"dropped": dropped, "missing": missing}


def build_swin_backbone(
    name: str,
    return_interm_indices: Sequence[int] = (1, 2, 3),
    use_checkpoint: bool = False,
    weights: str = "none",
    train_backbone: bool = True,
) -> SwinTransformer:
    """The published DINO Swin ``name`` (see :data:`SWIN_CONFIGS`) returning stages ``return_interm_indices``.

    Args:
        weights: 'none' (random) or a local .pth (published ImageNet Swin file or DINO checkpoint); nothing is
            downloaded.
        train_backbone: if False every parameter is frozen (``--lr_backbone 0``).
    """
    if name not in SWIN_CONFIGS:
        raise ValueError(f"--backbone {name}: unsupported Swin; choose one of {sorted(SWIN_CONFIGS)}")
    if weights == "imagenet":
        raise ValueError(
            f"--backbone_weights imagenet: Swin weights are not downloaded; pass a local file "
            f"(e.g. the published ImageNet .pth for {name}) or none"
        )
    model = SwinTransformer(SWIN_CONFIGS[name], return_interm_indices, use_checkpoint)
    if weights != "none":
        load_swin_weights(model, weights, name)
    model.requires_grad_(train_backbone)
    return model
