"""RT-DETR: backbone -> hybrid encoder -> decoder (Zhao et al. 2024; RT-DETRv2, Lv et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from util.misc import NestedTensor

__all__ = ["RTDETR"]


class RTDETR(nn.Module):
    """The detector: three backbone levels, fused by the encoder, decoded into K boxes (state-dict prefixes
    ``backbone.``, ``encoder.``, ``decoder.`` as published).

    Args:
        backbone: [B, 3, H, W] -> three maps of strides 8/16/32 (e.g. models.presnet.PResNet).
        encoder: HybridEncoder.
        decoder: RTDETRTransformerv2.
    """

    # The training loop passes the targets (denoising queries are built from them): model(samples, targets).
    needs_targets = True

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder

    @property
    def fixed_input_size(self) -> tuple[int, int] | None:
        """(H, W) an exported graph is fixed to (its anchors and position table are per-size buffers; only the
        batch stays dynamic), or None when they are computed per input (no --eval_spatial_size)."""
        size = getattr(self.decoder, "eval_spatial_size", None)
        return None if size is None else (int(size[0]), int(size[1]))

    def forward(self, x: Tensor | NestedTensor, targets: Sequence[dict[str, Tensor]] | None = None) -> dict:
        """Detect objects.

        Args:
            x: [B, 3, H, W] float images (H and W multiples of 32), or a NestedTensor (its padded tensor is used:
                RT-DETR has no padding mask).
            targets: per image {'labels' [T] int64, 'boxes' [T, 4] normalised cxcywh}; in training they add the
                denoising queries.

        Returns:
            The decoder's output dict ('pred_logits' [B, K, C], 'pred_boxes' [B, K, 4] normalised cxcywh, ...).
        """
        if isinstance(x, NestedTensor):
            x = x.tensors
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"RT-DETRv2: expected images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"RT-DETRv2: image height and width must be multiples of 32, got {tuple(x.shape[-2:])}")
        return self.decoder(self.encoder(self.backbone(x)), targets)
