"""Typed settings: what a family's ``build`` reads, instead of the argparse Namespace.

Field names are the argparse destinations of the flags (``--hidden_dim`` -> ``hidden_dim``), so
``Family.make_settings(vars(args))`` fills them; the parser stays the one source of defaults, so the fields have
none. Each family subclasses ``DetectorSettings`` with its own flags (``models/<family>/settings.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DetectorSettings"]


@dataclass(frozen=True)
class DetectorSettings:
    """The flags every family reads.

    Attributes:
        backbone: a torchvision ResNet ('resnet18', 'resnet34', 'resnet50', 'resnet101'), a published Swin
            ('swin_T_224_1k', ...) or 'timm:NAME' (``models.backbone.build_backbone``).
        backbone_weights: 'imagenet' (ResNets), 'none' or a local .pth path.
        backbone_stages: ResNet stages kept (2, 3 or 4).
        use_checkpoint: activation checkpointing in the Swin / timm backbone.
        dilation: dilate the last kept stage (DC5).
        lr_backbone: > 0 trains the backbone (layer2-4).
        position_embedding: 'sine' / 'v2' or 'learned' / 'v3'.
        hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout: the transformer.
        num_queries: object queries.
        aux_loss: return (and supervise) every decoder layer.
        num_classes: classifier size, or None for the dataset's default.
        dataset_file: 'coco', 'synthetic' or 'coco_panoptic'.
        device: where the criterion goes ('cuda', 'mps', 'cpu', ...).
        attention: decoder attention kernel, 'sdpa' or 'math'.
        set_cost_class, set_cost_bbox, set_cost_giou: matching cost weights.
        bbox_loss_coef, giou_loss_coef: box loss weights.
    """

    backbone: str
    backbone_weights: str
    backbone_stages: int
    use_checkpoint: bool
    dilation: bool
    lr_backbone: float
    position_embedding: str
    hidden_dim: int
    nheads: int
    enc_layers: int
    dec_layers: int
    dim_feedforward: int
    dropout: float
    num_queries: int
    aux_loss: bool
    num_classes: int | None
    dataset_file: str
    device: str
    attention: str
    set_cost_class: float
    set_cost_bbox: float
    set_cost_giou: float
    bbox_loss_coef: float
    giou_loss_coef: float
