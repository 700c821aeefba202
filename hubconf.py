"""torch.hub entry points for the published models of the detector families (DETR, Deformable DETR, DINO).

    model = torch.hub.load("path/to/this/repo", "detr_resnet50", source="local", pretrained=True)
    model, postprocessor = torch.hub.load(..., "detr_resnet50_panoptic", pretrained=True, return_postprocessor=True)

With ``pretrained=False`` (the default) nothing is downloaded: the backbone is random, or ImageNet / a local
file when ``backbone_weights`` says so. ``pretrained=True`` downloads the published COCO weights (into the
torch hub cache) and loads them with strict=True; another ``num_classes`` keeps every weight but the class head
(see ``run.finetune.load_for_finetuning``). Models are returned in training mode, as ``nn.Module``s are:
call ``model.eval()`` before inference.

Deformable DETR: ``deformable_detr_resnet50`` (multi-scale), ``_single_scale``, ``_single_scale_dc5``, ``_refine``
and ``_two_stage`` build the published recipes offline; the authors' weights have no direct download URL, so
``pretrained=True`` needs ``checkpoint='local/file.pth'`` (without it, a ValueError says where to get them).
DINO: ``dino_resnet50_4scale`` and ``dino_resnet50_5scale`` likewise (published weights on Google Drive only).
"""

from __future__ import annotations

import argparse

from torch import nn

dependencies = ["torch", "torchvision", "scipy"]

_URL = "https://dl.fbaipublicfiles.com/detr/"
# The summary line of a hub load that goes through run.finetune (other num_classes or options than the checkpoint's
# recipe): a plain load for inference, not a fine-tuning run.
_HUB_LOAD = "weights from"

# Published COCO checkpoints (box AP / PQ on COCO val2017 in the published model zoo).
CHECKPOINT_URLS = {
    "detr_resnet50": _URL + "detr-r50-e632da11.pth",
    "detr_resnet50_dc5": _URL + "detr-r50-dc5-f0fb7ef5.pth",
    "detr_resnet101": _URL + "detr-r101-2c7b67e5.pth",
    "detr_resnet101_dc5": _URL + "detr-r101-dc5-a2e86def.pth",
    "detr_resnet50_panoptic": _URL + "detr-r50-panoptic-00ce5173.pth",
    "detr_resnet50_dc5_panoptic": _URL + "detr-r50-dc5-panoptic-da08f1b1.pth",
    "detr_resnet101_panoptic": _URL + "detr-r101-panoptic-40021d53.pth",
}
# The published panoptic rule: category ids up to 90 are things, the rest stuff.
PANOPTIC_IS_THING_MAP = {i: i <= 90 for i in range(250)}


def _hub_args(backbone: str, dilation: bool, num_classes: int, masks: bool, backbone_weights: str, **overrides):
    from main import get_args_parser

    args = get_args_parser().parse_args([])
    args.backbone = backbone
    args.dilation = dilation
    args.num_classes = num_classes
    args.masks = masks
    args.dataset_file = "coco_panoptic" if masks else "coco"
    args.backbone_weights = backbone_weights
    args.aux_loss = False  # the published hub models return the final layer only
    args.device = "cpu"
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown model option {key!r}; use a main.py flag name such as num_queries or hidden_dim")
        setattr(args, key, value)
    return args


def _make(
    name: str,
    backbone: str,
    dilation: bool,
    masks: bool,
    pretrained: bool,
    num_classes: int,
    default_classes: int,
    backbone_weights: str,
    **overrides,
) -> tuple[nn.Module, dict[str, nn.Module], argparse.Namespace]:
    from models import build_model

    # A published checkpoint already holds the backbone: never fetch ImageNet weights for it.
    weights = "none" if pretrained else backbone_weights
    args = _hub_args(backbone, dilation, num_classes, masks, weights, **overrides)
    model, _, postprocessors = build_model(args)
    if pretrained:
        from run.checkpoint import load_checkpoint

        if num_classes == default_classes and not overrides:
            checkpoint = load_checkpoint(CHECKPOINT_URLS[name], check_hash=True)
            model.load_state_dict(checkpoint["model"], strict=True)
        else:
            from run.finetune import load_for_finetuning

            load_for_finetuning(model, CHECKPOINT_URLS[name], purpose=_HUB_LOAD)
    return model, postprocessors, args


def _detector(name, backbone, dilation, pretrained, num_classes, return_postprocessor, backbone_weights, **overrides):
    model, postprocessors, _ = _make(
        name, backbone, dilation, False, pretrained, num_classes, 91, backbone_weights, **overrides
    )
    return (model, postprocessors["bbox"]) if return_postprocessor else model


def _panoptic(
    name, backbone, dilation, pretrained, num_classes, threshold, return_postprocessor, backbone_weights, **overrides
):
    from models.detr.segmentation import PostProcessPanoptic

    model, _, _ = _make(name, backbone, dilation, True, pretrained, num_classes, 250, backbone_weights, **overrides)
    if return_postprocessor:
        return model, PostProcessPanoptic(PANOPTIC_IS_THING_MAP, threshold=threshold)
    return model


def detr_resnet50(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """DETR R50 (42.0 box AP on COCO val2017).

    Args:
        pretrained: download and load the published COCO weights.
        num_classes: max category id + 1; with ``pretrained``, a value other than 91 re-initialises the class head.
        return_postprocessor: also return ``PostProcess`` (logits and boxes -> scores, labels, pixel boxes).
        backbone_weights: without ``pretrained``: 'none' (random, offline), 'imagenet' (torchvision download)
            or a local ResNet .pth file.
        **overrides: other model flags of main.py, e.g. ``num_queries=50`` (then ``pretrained`` fine-tunes).

    Returns:
        The model, or (model, postprocessor) with ``return_postprocessor``.
    """
    return _detector(
        "detr_resnet50", "resnet50", False, pretrained, num_classes, return_postprocessor, backbone_weights, **overrides
    )


def detr_resnet50_dc5(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """DETR R50 with a dilated last stage (43.3 box AP). Arguments as :func:`detr_resnet50`."""
    return _detector(
        "detr_resnet50_dc5",
        "resnet50",
        True,
        pretrained,
        num_classes,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


def detr_resnet101(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """DETR R101 (43.5 box AP). Arguments as :func:`detr_resnet50`."""
    return _detector(
        "detr_resnet101",
        "resnet101",
        False,
        pretrained,
        num_classes,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


def detr_resnet101_dc5(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """DETR R101 with a dilated last stage (44.9 box AP). Arguments as :func:`detr_resnet50`."""
    return _detector(
        "detr_resnet101_dc5",
        "resnet101",
        True,
        pretrained,
        num_classes,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


def detr_resnet50_panoptic(
    pretrained: bool = False,
    num_classes: int = 250,
    threshold: float = 0.85,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """Panoptic DETR R50 (43.4 PQ on COCO panoptic val2017).

    Args:
        pretrained: download and load the published COCO panoptic weights.
        num_classes: 250 for COCO panoptic (max category id + 1).
        threshold: minimum class probability of a kept segment in ``PostProcessPanoptic``.
        return_postprocessor: also return ``PostProcessPanoptic`` (ids up to 90 are things).
        backbone_weights, **overrides: as for :func:`detr_resnet50`.

    Returns:
        The DETRsegm model, or (model, postprocessor) with ``return_postprocessor``.
    """
    return _panoptic(
        "detr_resnet50_panoptic",
        "resnet50",
        False,
        pretrained,
        num_classes,
        threshold,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


def detr_resnet50_dc5_panoptic(
    pretrained: bool = False,
    num_classes: int = 250,
    threshold: float = 0.85,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """Panoptic DETR R50-DC5 (44.6 PQ). Arguments as :func:`detr_resnet50_panoptic`."""
    return _panoptic(
        "detr_resnet50_dc5_panoptic",
        "resnet50",
        True,
        pretrained,
        num_classes,
        threshold,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


def detr_resnet101_panoptic(
    pretrained: bool = False,
    num_classes: int = 250,
    threshold: float = 0.85,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    **overrides,
):
    """Panoptic DETR R101 (45.1 PQ). Arguments as :func:`detr_resnet50_panoptic`."""
    return _panoptic(
        "detr_resnet101_panoptic",
        "resnet101",
        False,
        pretrained,
        num_classes,
        threshold,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


# ------------------------------------------------------------------------------------------ Deformable DETR

# The five published R50 recipes (Zhu et al., ICLR 2021; box AP on COCO val2017 after 50 epochs as published).
DEFORMABLE_RECIPES = {
    "deformable_detr_resnet50": {},  # 44.5
    "deformable_detr_resnet50_single_scale": {"num_feature_levels": 1},  # 39.4
    "deformable_detr_resnet50_single_scale_dc5": {"num_feature_levels": 1, "dilation": True},  # 41.5
    "deformable_detr_resnet50_refine": {"with_box_refine": True},  # 46.2
    "deformable_detr_resnet50_two_stage": {"with_box_refine": True, "two_stage": True},  # 46.9
}
DEFORMABLE_ZOO = "https://github.com/fundamentalvision/Deformable-DETR"
# DINO R50 (Zhang et al., ICLR 2023; box AP on COCO val2017 as published: 4-scale 49.0 after 12 epochs, 5-scale 51.3
# after 24). Every other flag takes the family's published 4-scale default.
DINO_RECIPES = {
    "dino_resnet50_4scale": {},
    "dino_resnet50_5scale": {"num_feature_levels": 5, "return_interm_indices": [0, 1, 2, 3]},
}
DINO_ZOO = "https://github.com/IDEA-Research/DINO"


def _deformable(name, pretrained, num_classes, return_postprocessor, backbone_weights, checkpoint, **overrides):
    """Build a Deformable DETR (or DINO) recipe offline; load ``checkpoint`` (a local file) when given."""
    from main import get_args_parser
    from models import build_model

    family, recipes, zoo = ("dino", DINO_RECIPES, DINO_ZOO) if name in DINO_RECIPES else (
        "deformable_detr", DEFORMABLE_RECIPES, DEFORMABLE_ZOO)  # fmt: skip
    if pretrained and checkpoint is None:
        # The authors publish these weights on Google Drive only: no direct URL torch.hub could fetch.
        raise ValueError(
            f"{name}(pretrained=True): the authors' weights have no direct download URL (Google Drive, see "
            f"{zoo}); download this recipe's checkpoint and pass checkpoint='path/to/file.pth'"
        )
    args = get_args_parser().parse_args(["--model", family])  # the family's published defaults
    recipe = {**recipes[name], **overrides}
    args.num_classes = num_classes
    args.backbone_weights = "none" if checkpoint is not None else backbone_weights  # the checkpoint holds them
    args.aux_loss = False  # as DETR's hub models: the last decoder layer only
    args.device = "cpu"
    for key, value in recipe.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown model option {key!r}; use a main.py flag name such as num_queries or hidden_dim")
        setattr(args, key, value)
    model, _, postprocessors = build_model(args)
    if checkpoint is not None:
        if num_classes == 91 and not overrides:
            from run.checkpoint import load_checkpoint

            model.load_state_dict(load_checkpoint(checkpoint)["model"], strict=True)
        else:  # another head size: a fine-tuning start (class heads keep their focal-prior initialisation; DINO:
            # label_enc too, its label book following num_classes)
            from run.finetune import load_for_finetuning

            load_for_finetuning(model, checkpoint, keep_initial=True, purpose=_HUB_LOAD)
    return (model, postprocessors["bbox"]) if return_postprocessor else model


def deformable_detr_resnet50(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """Deformable DETR R50, multi-scale (4 levels; 44.5 box AP published).

    Args:
        pretrained: load the authors' COCO weights; they cannot be downloaded from here, so this needs
            ``checkpoint`` (otherwise a ValueError says where to get them).
        num_classes: sigmoid classes (91 for COCO); another value with a checkpoint re-initialises the class heads.
        return_postprocessor: also return ``PostProcessTopK`` (top-100 scores, labels, pixel boxes).
        backbone_weights: without a checkpoint: 'none' (random, offline), 'imagenet' (torchvision download) or a
            local ResNet .pth file.
        checkpoint: local path (or https URL) of the recipe's published or a trained checkpoint, loaded strictly.
        **overrides: other model flags of main.py, e.g. ``num_queries=100``.

    Returns:
        The model, or (model, postprocessor) with ``return_postprocessor``.
    """
    return _deformable("deformable_detr_resnet50", pretrained, num_classes, return_postprocessor, backbone_weights,
                       checkpoint, **overrides)  # fmt: skip


def deformable_detr_resnet50_single_scale(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """Single-scale Deformable DETR R50 (layer4 only; 39.4 box AP published). Arguments as
    :func:`deformable_detr_resnet50`."""
    return _deformable("deformable_detr_resnet50_single_scale", pretrained, num_classes, return_postprocessor,
                       backbone_weights, checkpoint, **overrides)  # fmt: skip


def deformable_detr_resnet50_single_scale_dc5(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """Single-scale Deformable DETR R50-DC5 (dilated layer4; 41.5 box AP published). Arguments as
    :func:`deformable_detr_resnet50`."""
    return _deformable("deformable_detr_resnet50_single_scale_dc5", pretrained, num_classes, return_postprocessor,
                       backbone_weights, checkpoint, **overrides)  # fmt: skip


def deformable_detr_resnet50_refine(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """Deformable DETR R50 with iterative box refinement (46.2 box AP published). Arguments as
    :func:`deformable_detr_resnet50`."""
    return _deformable("deformable_detr_resnet50_refine", pretrained, num_classes, return_postprocessor,
                       backbone_weights, checkpoint, **overrides)  # fmt: skip


def deformable_detr_resnet50_two_stage(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """Two-stage Deformable DETR R50 with box refinement (46.9 box AP published). Arguments as
    :func:`deformable_detr_resnet50`."""
    return _deformable("deformable_detr_resnet50_two_stage", pretrained, num_classes, return_postprocessor,
                       backbone_weights, checkpoint, **overrides)  # fmt: skip


# ------------------------------------------------------------------------------------------ DINO


def dino_resnet50_4scale(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """DINO R50, 4 scales (ResNet stages 2-4 plus one strided level; 49.0 box AP after 12 epochs published).

    Arguments as :func:`deformable_detr_resnet50`; the postprocessor keeps the top 300 (``num_select``). Another
    ``num_classes`` with a checkpoint re-initialises the class heads and ``label_enc`` (the label book follows
    ``num_classes`` unless ``dn_labelbook_size`` is given).
    """
    return _deformable("dino_resnet50_4scale", pretrained, num_classes, return_postprocessor, backbone_weights,
                       checkpoint, **overrides)  # fmt: skip


def dino_resnet50_5scale(
    pretrained: bool = False,
    num_classes: int = 91,
    return_postprocessor: bool = False,
    backbone_weights: str = "none",
    checkpoint: str | None = None,
    **overrides,
):
    """DINO R50, 5 scales (ResNet stages 1-4 plus one strided level; 51.3 box AP after 24 epochs published).
    Arguments as :func:`dino_resnet50_4scale`."""
    return _deformable("dino_resnet50_5scale", pretrained, num_classes, return_postprocessor, backbone_weights,
                       checkpoint, **overrides)  # fmt: skip


# ------------------------------------------------------------------------------------------ RT-DETRv2

RTDETR_ZOO = "https://github.com/lyuwenyu/RT-DETR (rtdetrv2_pytorch)"


def _rtdetrv2(name, pretrained=False, num_classes=80, return_postprocessor=False, backbone_weights="none",
              checkpoint=None, **overrides):  # fmt: skip
    """Build an RT-DETRv2 recipe offline (``models.FAMILIES['rtdetrv2'].hub_recipes``); load ``checkpoint``, a local
    published ``.pth`` (``ema.module`` first, else ``model``) or one of this project, when given."""
    from main import get_args_parser
    from models import FAMILIES, build_model
    from run.checkpoint import inference_weights, load_checkpoint

    if pretrained and checkpoint is None:
        raise ValueError(f"{name}(pretrained=True): download the recipe's .pth from {RTDETR_ZOO} and pass "
                         "checkpoint='path/to/file.pth'")  # fmt: skip
    args = get_args_parser().parse_args(["--model", "rtdetrv2"])  # the family's published defaults (R50vd 6x)
    values = {**FAMILIES["rtdetrv2"].hub_recipes[name], **overrides, "num_classes": num_classes, "device": "cpu",
              "backbone_weights": "none" if checkpoint is not None else backbone_weights}  # fmt: skip
    for key, value in values.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown model option {key!r}; use a main.py flag name such as num_queries or hidden_dim")
        setattr(args, key, value)
    model, _, postprocessors = build_model(args)
    if checkpoint is not None:
        if num_classes == 80 and not overrides:
            model.load_state_dict(inference_weights(load_checkpoint(checkpoint)), strict=True)
        else:  # another head size: a fine-tuning start (score heads keep their focal prior)
            from run.finetune import load_for_finetuning

            load_for_finetuning(model, checkpoint, keep_initial=True, purpose=_HUB_LOAD)
    return (model, postprocessors["bbox"]) if return_postprocessor else model


def _rtdetrv2_entry(name: str, summary: str):
    def entry(pretrained=False, num_classes=80, return_postprocessor=False, backbone_weights="none", checkpoint=None,
              **overrides):  # fmt: skip
        return _rtdetrv2(name, pretrained, num_classes, return_postprocessor, backbone_weights, checkpoint, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"RT-DETRv2 {summary} on COCO val2017 as published). ``pretrained=True`` needs "
                     "checkpoint='local .pth'; ``backbone_weights``: 'none' or a local ResNet*_vd file.")  # fmt: skip
    return entry


rtdetrv2_r18vd = _rtdetrv2_entry("rtdetrv2_r18vd", "R18vd, 120 epochs (48.1 AP")
rtdetrv2_r34vd = _rtdetrv2_entry("rtdetrv2_r34vd", "R34vd, 120 epochs (49.9 AP")
rtdetrv2_r50vd = _rtdetrv2_entry("rtdetrv2_r50vd", "R50vd, 72 epochs (53.4 AP")
rtdetrv2_r50vd_m = _rtdetrv2_entry("rtdetrv2_r50vd_m", "R50vd-M, 84 epochs (51.9 AP")
rtdetrv2_r101vd = _rtdetrv2_entry("rtdetrv2_r101vd", "R101vd, 72 epochs (54.3 AP")
