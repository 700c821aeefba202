"""RT-DETRv2 settings as one typed dataclass, and the five published COCO recipes as named presets.

Field names follow the framework's flags (DESIGN_RTDETR "Recipes and proposed flags"); defaults are the R50vd 6x
recipe (the family defaults). Model fields are read by :func:`models.rtdetrv2.build.build`; the training fields
(solver, EMA, data schedule) are for the training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["RECIPES", "MULTISCALE_SIZES", "RTDETRv2Config", "recipe"]

MULTISCALE_SIZES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


@dataclass(frozen=True)
class RTDETRv2Config:
    """Every RT-DETRv2 setting (R50vd 6x defaults). num_classes is given to ``build`` separately."""

    # Backbone (PResNet-vd).
    backbone: str = "presnet50vd"
    backbone_weights: str | None = None  # local ImageNet ResNet*_vd* file, loaded strictly; None = random init
    return_interm_indices: tuple[int, ...] = (1, 2, 3)
    freeze_at: int = 0  # -1: nothing frozen; k >= 0: stem + first k stages
    freeze_norm: bool = True  # FrozenBatchNorm2d in the backbone
    # Hybrid encoder.
    enc_hidden_dim: int = 256
    enc_dim_feedforward: int = 1024
    enc_expansion: float = 1.0
    enc_layers: int = 1
    # Decoder.
    hidden_dim: int = 256
    nheads: int = 8
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    num_queries: int = 300
    num_feature_levels: int = 3
    dec_n_points: int = 4
    eval_idx: int = -1
    eval_spatial_size: tuple[int, int] | None = (640, 640)  # (H, W); None: anchors/positions per input
    aux_loss: bool = True
    # Denoising.
    dn_number: int = 100
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0
    # Matcher and losses.
    focal_alpha: float = 0.25  # matcher's focal cost
    vfl_alpha: float = 0.75
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0  # weight of loss_vfl
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    # Post-processing.
    num_select: int = 300
    remap_mscoco_category: bool = True
    # Solver (published: AdamW, linear warm-up, EMA, fp16 AMP).
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0
    bias_weight_decay: float | None = None  # None: = weight_decay
    epochs: int = 72
    lr_drop: int = 1000
    clip_max_norm: float = 0.1
    batch_size: int = 4
    warmup_iters: int = 2000
    ema_decay: float = 0.9999  # 0 = off
    ema_warmups: int = 2000
    amp: str = "fp16"
    sync_bn: bool = True
    # Data schedule.
    aug_stop_epoch: int = 71
    multiscale_sizes: tuple[int, ...] = field(default=MULTISCALE_SIZES)  # () = off
    multiscale_stop_epoch: int = 71

    def __post_init__(self) -> None:
        if self.num_feature_levels != 3 or tuple(self.return_interm_indices) != (1, 2, 3):
            raise ValueError("RT-DETRv2: the hybrid encoder takes exactly 3 levels (return_interm_indices 1 2 3)")
        if not -self.dec_layers <= self.eval_idx < self.dec_layers:
            raise ValueError(f"RT-DETRv2: eval_idx {self.eval_idx} out of range for {self.dec_layers} decoder layers")
        if self.eval_spatial_size is not None and any(s <= 0 or s % 32 for s in self.eval_spatial_size):
            raise ValueError(
                f"RT-DETRv2: eval_spatial_size must be positive multiples of 32, got {self.eval_spatial_size}"
            )
        if self.enc_hidden_dim % 8 or self.hidden_dim % self.nheads:
            raise ValueError("RT-DETRv2: enc_hidden_dim must divide by 8 and hidden_dim by nheads")


_R50 = RTDETRv2Config()

# The five published COCO recipes (rtdetrv2_{name}_coco.yml), published AP in the comments.
RECIPES: dict[str, RTDETRv2Config] = {
    "r18vd": dataclasses.replace(  # 120e, 48.1 AP
        _R50,
        backbone="presnet18vd",
        freeze_at=-1,
        freeze_norm=False,
        enc_expansion=0.5,
        dec_layers=3,
        epochs=120,
        aug_stop_epoch=117,
        multiscale_sizes=(),
        lr_backbone=1e-4,
    ),
    "r34vd": dataclasses.replace(  # 120e, 49.9 AP
        _R50,
        backbone="presnet34vd",
        freeze_at=-1,
        freeze_norm=False,
        enc_expansion=0.5,
        dec_layers=4,
        epochs=120,
        aug_stop_epoch=117,
        multiscale_stop_epoch=117,
        lr_backbone=5e-5,
        bias_weight_decay=0.0,
    ),
    "r50vd": _R50,  # 6x, 53.4 AP
    "r50vd_m": dataclasses.replace(  # 7x, 51.9 AP
        _R50,
        enc_expansion=0.5,
        eval_idx=2,
        epochs=84,
        aug_stop_epoch=81,
        multiscale_stop_epoch=81,
    ),
    "r101vd": dataclasses.replace(  # 6x, 54.3 AP
        _R50,
        backbone="presnet101vd",
        enc_hidden_dim=384,
        enc_dim_feedforward=2048,
        lr_backbone=1e-6,
    ),
}


def recipe(name: str, **overrides) -> RTDETRv2Config:
    """A published recipe by name, with optional field overrides (``recipe('r18vd', dec_layers=2)``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown RT-DETRv2 recipe {name!r}; expected one of {sorted(RECIPES)}")
    try:
        return dataclasses.replace(RECIPES[name], **overrides)
    except TypeError as err:
        raise ValueError(f"RT-DETRv2 recipe {name!r}: {err}") from err
