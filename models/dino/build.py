"""``build(settings, num_classes) -> (model, criterion, postprocessors)`` of DINO."""

from __future__ import annotations

from ..criterion import place_criterion
from ..deformable_detr.build import check_settings
from ..family import BuildResult
from ..multiscale import build_multiscale_backbone
from ..postprocess import PostProcessTopK
from .criterion import build_dino_criterion
from .model import DINO, DINOTransformer
from .settings import DINOSettings

__all__ = ["build"]


def build(settings: DINOSettings, num_classes: int) -> BuildResult:
    """DINO, its criterion and the top-``num_select`` 'bbox' postprocessor.

    Raises:
        ValueError: naming the flags that do not combine (DETR options, --lr_backbone 0, too few
            --num_feature_levels for --return_interm_indices, a label book smaller than the classes).
    """
    check_settings(settings, "dino", return_interm_indices=settings.return_interm_indices)
    if settings.lr_backbone <= 0:
        raise ValueError("--model dino needs --lr_backbone > 0 (published: the backbone always trains)")
    stage_indices = sorted(settings.return_interm_indices)
    if settings.num_feature_levels < len(stage_indices):
        raise ValueError(
            f"--num_feature_levels {settings.num_feature_levels} is fewer than the {len(stage_indices)} stages of "
            f"--return_interm_indices {stage_indices}"
        )
    transformer = DINOTransformer(
        d_model=settings.hidden_dim, nhead=settings.nheads, num_encoder_layers=settings.enc_layers,
        num_decoder_layers=settings.dec_layers, dim_feedforward=settings.dim_feedforward, dropout=settings.dropout,
        num_feature_levels=settings.num_feature_levels, dec_n_points=settings.dec_n_points,
        enc_n_points=settings.enc_n_points, num_queries=settings.num_queries, attention=settings.attention,
    )  # fmt: skip
    labelbook = num_classes if settings.dn_labelbook_size is None else settings.dn_labelbook_size
    if labelbook < num_classes:
        raise ValueError(f"--dn_labelbook_size {labelbook} is smaller than num_classes {num_classes}")
    # Published PositionEmbeddingSineHW: per-axis temperatures, no offset, --position_embedding_scale.
    backbone = build_multiscale_backbone(
        settings, stage_indices, scale=settings.position_embedding_scale, temperature=settings.pe_temperatureH,
        temperature_w=settings.pe_temperatureW,
    )  # fmt: skip
    model = DINO(
        backbone, transformer, num_classes=num_classes,
        num_queries=settings.num_queries, num_feature_levels=settings.num_feature_levels, aux_loss=settings.aux_loss,
        dn_number=settings.dn_number, dn_label_noise_ratio=settings.dn_label_noise_ratio,
        dn_box_noise_scale=settings.dn_box_noise_scale, dn_labelbook_size=labelbook,
    )  # fmt: skip
    criterion = place_criterion(build_dino_criterion(settings, num_classes), settings.device)
    return model, criterion, {"bbox": PostProcessTopK(num_select=settings.num_select)}
