"""DINO's settings: the multi-scale flags it shares with Deformable DETR plus its own (config/DINO names)."""

from __future__ import annotations

from dataclasses import dataclass

from ..deformable_detr.settings import MultiScaleSettings

__all__ = ["DINOSettings"]


@dataclass(frozen=True)
class DINOSettings(MultiScaleSettings):
    """``MultiScaleSettings`` plus DINO's flags.

    Attributes:
        return_interm_indices: ResNet stages (0 = layer1) used as feature levels.
        pe_temperatureH, pe_temperatureW: the sine encoding's temperatures along y and x.
        dn_number, dn_label_noise_ratio, dn_box_noise_scale: contrastive denoising queries and their noise.
        dn_labelbook_size: label embeddings, None for num_classes.
        num_select: detections kept per image.
        interm_loss_coef: weight of the encoder (``_interm``) losses.
        no_interm_box_loss: no box losses on the encoder outputs.
    """

    return_interm_indices: list[int]
    pe_temperatureH: int  # noqa: N815 (the published flag name)
    pe_temperatureW: int  # noqa: N815
    dn_number: int
    dn_label_noise_ratio: float
    dn_box_noise_scale: float
    dn_labelbook_size: int | None
    num_select: int
    interm_loss_coef: float
    no_interm_box_loss: bool
