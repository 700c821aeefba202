"""torch.hub entry points for the published models of the detector families (DETR, Deformable DETR, DINO,
RT-DETRv2).

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
RT-DETRv2: ``rtdetrv2_r18vd``, ``_r34vd``, ``_r50vd``, ``_r50vd_m``, ``_r101vd`` likewise (``checkpoint=`` a local
published ``.pth`` or one of this project).
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


def _recipe_args(name: str, num_classes: int, backbone_weights: str, **overrides) -> argparse.Namespace:
    """The flags of hub recipe ``name`` (``Family.hub_recipes`` of the family that lists it) over that family's
    published defaults, with ``num_classes``, ``backbone_weights`` and the caller's model options."""
    from main import get_args_parser
    from models import FAMILIES

    family = next(f for f in FAMILIES.values() if name in f.hub_recipes)
    values = vars(get_args_parser().parse_args(["--model", family.name]))
    unknown = [key for key in overrides if key not in values]
    if unknown:
        raise TypeError(
            f"unknown model option {unknown[0]!r}; use a main.py flag name such as num_queries or hidden_dim"
        )
    values.update(family.hub_recipes[name])
    # The published hub models return the final decoder layer only.
    values.update(num_classes=num_classes, backbone_weights=backbone_weights, aux_loss=False, device="cpu")
    values.update(overrides)
    return argparse.Namespace(**values)


def _missing_weights(name: str) -> ValueError:
    """``pretrained=True`` for a recipe whose published weights torch.hub cannot download."""
    from models import FAMILIES

    source = next(f.weights_source for f in FAMILIES.values() if name in f.hub_recipes)
    return ValueError(
        f"{name}(pretrained=True): the authors' weights have no direct download URL (see {source}); download this "
        "recipe's checkpoint and pass checkpoint='path/to/file.pth'"
    )


def _make(
    name: str,
    pretrained: bool,
    num_classes: int,
    default_classes: int,
    backbone_weights: str,
    **overrides,
) -> tuple[nn.Module, dict[str, nn.Module], argparse.Namespace]:
    from models import build_model

    # A published checkpoint already holds the backbone: never fetch ImageNet weights for it.
    weights = "none" if pretrained else backbone_weights
    args = _recipe_args(name, num_classes, weights, **overrides)
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


def _detector(name, pretrained, num_classes, return_postprocessor, backbone_weights, **overrides):
    model, postprocessors, _ = _make(name, pretrained, num_classes, 91, backbone_weights, **overrides)
    return (model, postprocessors["bbox"]) if return_postprocessor else model


def _panoptic(name, pretrained, num_classes, threshold, return_postprocessor, backbone_weights, **overrides):
    from models.detr.segmentation import PostProcessPanoptic

    model, _, _ = _make(name, pretrained, num_classes, 250, backbone_weights, **overrides)
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
    return _detector("detr_resnet50", pretrained, num_classes, return_postprocessor, backbone_weights, **overrides)


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
        pretrained,
        num_classes,
        threshold,
        return_postprocessor,
        backbone_weights,
        **overrides,
    )


# ------------------------------------------------------------------------------------------ Deformable DETR


# The five published R50 recipes (Zhu et al., ICLR 2021; box AP on COCO val2017 after 50 epochs as published).
def _deformable(name, pretrained, num_classes, return_postprocessor, backbone_weights, checkpoint, **overrides):
    """Build a Deformable DETR (or DINO) recipe offline; load ``checkpoint`` (a local file) when given."""
    from models import build_model

    if pretrained and checkpoint is None:
        raise _missing_weights(name)
    # A checkpoint holds the backbone: never fetch ImageNet weights for it.
    args = _recipe_args(name, num_classes, "none" if checkpoint is not None else backbone_weights, **overrides)
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


def _rtdetrv2(name, pretrained=False, num_classes=80, return_postprocessor=False, backbone_weights="none",
              checkpoint=None, **overrides):  # fmt: skip
    """Build an RT-DETRv2 recipe offline (``models.FAMILIES['rtdetrv2'].hub_recipes``); load ``checkpoint``, a local
    published ``.pth`` (``ema.module`` first, else ``model``) or one of this project, when given."""
    from models import build_model
    from run.checkpoint import inference_weights, load_checkpoint

    if pretrained and checkpoint is None:
        raise _missing_weights(name)
    args = _recipe_args(name, num_classes, "none" if checkpoint is not None else backbone_weights, **overrides)
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
