"""RT-DETRv2's settings: the flags the family reads (DESIGN_RTDETR "Recipes and proposed flags").

Not a subclass of ``models.settings.DetectorSettings``: RT-DETRv2 has no ResNet stage choice, dilation, DETR
position encoding or attention-kernel switch, and a flag no field names is refused for ``--model rtdetrv2``
(``cli.arguments.check_family_flags``). The solver flags (``--lr``, ``--ema_decay``, ``--warmup_iters``, ...) are
the training loop's, not the model's, so they are not fields either.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RTDETRv2Config

__all__ = ["RTDETRv2Settings"]


@dataclass(frozen=True)
class RTDETRv2Settings:
    """The flags ``--model rtdetrv2`` reads (argparse destinations; the parser holds the defaults).

    Attributes:
        backbone: 'presnet18vd', 'presnet34vd', 'presnet50vd' or 'presnet101vd'.
        backbone_weights: 'none' (random) or a local published ``ResNet*_vd*`` ImageNet file (loaded strictly);
            'imagenet' is refused (those files are not downloadable through torchvision).
        lr_backbone: the backbone's learning rate (the training loop's parameter groups; read here so it is
            accepted for this family).
        return_interm_indices: backbone stages fed to the encoder (must be 1 2 3).
        freeze_at: -1 nothing frozen; k >= 0 the stem and the first k stages.
        freeze_norm: FrozenBatchNorm2d instead of BatchNorm2d in the backbone.
        enc_hidden_dim, enc_dim_feedforward, enc_expansion, enc_layers: the hybrid encoder (AIFI layers).
        hidden_dim, nheads, dec_layers, dim_feedforward, dropout, num_queries, num_feature_levels, dec_n_points:
            the decoder (num_feature_levels must be 3).
        eval_idx: decoder layer whose boxes evaluation returns (-1: the last).
        eval_spatial_size: [H, W] of evaluation inputs (its anchors are saved buffers); [] or None: anchors per input.
        aux_loss: supervise every decoder layer.
        dn_number, dn_label_noise_ratio, dn_box_noise_scale: denoising queries.
        focal_alpha: alpha of the matcher's focal cost.
        set_cost_class, set_cost_bbox, set_cost_giou: matching cost weights.
        cls_loss_coef, bbox_loss_coef, giou_loss_coef: weights of loss_vfl, loss_bbox, loss_giou.
        num_select: detections per image.
        remap_mscoco_category: labels are the index of the category id among the dataset's sorted ids (COCO:
            0..79, published), mapped back by the post-processor; False: labels are the category ids.
        num_classes: classifier size, or None for the dataset's default.
        dataset_file: 'coco' or 'synthetic'.
        device: where the criterion goes.
        aug_stop_epoch: first epoch without photometric distortion, zoom-out and IoU crop.
        multiscale_sizes: square batch sizes drawn per training batch ([] = off).
        multiscale_stop_epoch: first epoch at the fixed training size.
    """

    backbone: str
    backbone_weights: str
    lr_backbone: float
    return_interm_indices: list[int]
    freeze_at: int
    freeze_norm: bool
    enc_hidden_dim: int
    enc_dim_feedforward: int
    enc_expansion: float
    enc_layers: int
    hidden_dim: int
    nheads: int
    dec_layers: int
    dim_feedforward: int
    dropout: float
    num_queries: int
    num_feature_levels: int
    dec_n_points: int
    eval_idx: int
    eval_spatial_size: list[int] | None
    aux_loss: bool
    dn_number: int
    dn_label_noise_ratio: float
    dn_box_noise_scale: float
    focal_alpha: float
    set_cost_class: float
    set_cost_bbox: float
    set_cost_giou: float
    cls_loss_coef: float
    bbox_loss_coef: float
    giou_loss_coef: float
    num_select: int
    remap_mscoco_category: bool
    num_classes: int | None
    dataset_file: str
    device: str
    aug_stop_epoch: int
    multiscale_sizes: list[int]
    multiscale_stop_epoch: int

    def model_config(self) -> RTDETRv2Config:
        """The model part of :class:`RTDETRv2Config` (its solver fields keep their defaults: unused by build).

        Raises:
            ValueError: one line naming the flag whose value RT-DETRv2 cannot build with.
        """
        weights = self.backbone_weights
        if weights == "imagenet":
            raise ValueError(
                "--model rtdetrv2 --backbone_weights imagenet: the published PResNet-vd ImageNet files "
                "(ResNet18_vd, ResNet34_vd, ResNet50_vd_ssld_v2, ResNet101_vd_ssld) are not downloaded here; pass "
                "the local file's path, or --backbone_weights none for random weights"
            )
        if self.num_feature_levels != 3:
            raise ValueError(f"--num_feature_levels {self.num_feature_levels}: RT-DETRv2's encoder takes exactly 3")
        if list(self.return_interm_indices) != [1, 2, 3]:
            raise ValueError(
                f"--return_interm_indices {' '.join(map(str, self.return_interm_indices))}: RT-DETRv2 takes the "
                "backbone stages 1 2 3"
            )
        odd = [s for s in self.multiscale_sizes if s <= 0 or s % 32]
        if odd:
            raise ValueError(f"--multiscale_sizes {odd[0]}: RT-DETRv2 takes sizes that are multiples of 32")
        size = self.eval_spatial_size
        size = list(size) if size else None
        if size is not None and len(size) != 2:
            raise ValueError(f"--eval_spatial_size takes 2 values (H W) or none, got {len(size)}")
        return RTDETRv2Config(
            backbone=self.backbone,
            backbone_weights=None if weights in ("none", "", None) else weights,
            return_interm_indices=tuple(self.return_interm_indices),
            freeze_at=self.freeze_at,
            freeze_norm=self.freeze_norm,
            enc_hidden_dim=self.enc_hidden_dim,
            enc_dim_feedforward=self.enc_dim_feedforward,
            enc_expansion=self.enc_expansion,
            enc_layers=self.enc_layers,
            hidden_dim=self.hidden_dim,
            nheads=self.nheads,
            dec_layers=self.dec_layers,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            num_queries=self.num_queries,
            num_feature_levels=self.num_feature_levels,
            dec_n_points=self.dec_n_points,
            eval_idx=self.eval_idx,
            eval_spatial_size=None if size is None else (int(size[0]), int(size[1])),
            aux_loss=self.aux_loss,
            dn_number=self.dn_number,
            dn_label_noise_ratio=self.dn_label_noise_ratio,
            dn_box_noise_scale=self.dn_box_noise_scale,
            focal_alpha=self.focal_alpha,
            set_cost_class=self.set_cost_class,
            set_cost_bbox=self.set_cost_bbox,
            set_cost_giou=self.set_cost_giou,
            cls_loss_coef=self.cls_loss_coef,
            bbox_loss_coef=self.bbox_loss_coef,
            giou_loss_coef=self.giou_loss_coef,
            num_select=self.num_select,
            remap_mscoco_category=self.remap_mscoco_category,
        )
