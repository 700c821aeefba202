"""DINO set-prediction loss: Deformable DETR's focal-loss criterion plus the contrastive denoising losses.

DINO adds, to FocalSetCriterion: logged L1 parts ``loss_xy``/``loss_hw``; its GIoU epsilon (1e-6); the losses of
the encoder's selected queries (``interm_outputs``, suffix ``_interm``); and the denoising losses (``_dn``,
``_dn_{i}``) of the dn queries, supervised by construction (no matching): positive slot ``g*2*max_gt + j`` of
group g reconstructs target j; negative slots and padding are background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..criterion import expand_weight_dict
from ..focal_criterion import FocalSetCriterion
from ..matcher import build_matcher

if TYPE_CHECKING:
    from .settings import DINOSettings

__all__ = ["DINO_GIOU_EPS", "DINOCriterion", "build_dino_criterion", "build_dino_weight_dict", "dn_positive_indices"]

Indices = list[tuple[Tensor, Tensor]]

# DINO's box_ops add 1e-6 to the IoU and GIoU denominators, in the matcher and the loss (DESIGN_DINO "Matcher").
DINO_GIOU_EPS = 1e-6

# Loss entries of each loss type on a non-main output (no class_error), for the zero dn entries.
_UNLOGGED_NAMES = {
    "labels": ("loss_ce",),
    "boxes": ("loss_bbox", "loss_giou", "loss_xy", "loss_hw"),
    "cardinality": ("cardinality_error",),
}


def dn_positive_indices(targets: Sequence[dict], pad_size: int, num_dn_group: int) -> Indices:
    """The fixed dn "matching": per image (dn slot indices, target indices), int64, group-major.

    Target j of an image sits in the positive slot ``g * 2 * max_gt + j`` of every group g, with
    ``max_gt = pad_size // (2 * num_dn_group)`` (its negative copy, ``+ max_gt``, gets no target).
    """
    single_pad = pad_size // num_dn_group
    indices = []
    for target in targets:
        # On the host, like the matcher's indices.
        tgt = torch.arange(len(target["labels"])).repeat(num_dn_group)
        group = torch.arange(num_dn_group).repeat_interleave(len(target["labels"]))
        indices.append((group * single_pad + tgt, tgt))
    return indices


class DINOCriterion(FocalSetCriterion):
    """DINO losses: those of FocalSetCriterion plus loss_xy/loss_hw, ``_interm`` and denoising ``_dn``/``_dn_{i}``.

    Args: as FocalSetCriterion (DINO: losses 'labels', 'boxes', 'cardinality').
    """

    giou_eps = DINO_GIOU_EPS

    def loss_boxes(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """loss_bbox and loss_giou as DETR (GIoU with DINO's eps); logged (no gradient) loss_xy and loss_hw."""
        losses = super().loss_boxes(outputs, targets, indices, num_boxes)
        with torch.no_grad():
            src_boxes, target_boxes = self._matched_boxes(outputs, targets, indices)
            l1 = F.l1_loss(src_boxes, target_boxes, reduction="none")
            losses["loss_xy"] = l1[:, :2].sum() / num_boxes
            losses["loss_hw"] = l1[:, 2:].sum() / num_boxes
        return losses

    def _named_outputs(self, outputs: dict) -> list[tuple[str, dict]]:
        """Main, aux ``_i`` and the encoder's selected queries ``_interm``, all matched against the targets."""
        named = super()._named_outputs(outputs)
        if "interm_outputs" in outputs:
            named.append(("_interm", outputs["interm_outputs"]))
        return named

    def _extra_losses(self, outputs: dict, targets: Sequence[dict], num_boxes: float) -> dict[str, Tensor]:
        """``_dn`` losses of the last layer and ``_dn_{i}`` of each aux layer (zeros without a dn part)."""
        losses = super()._extra_losses(outputs, targets, num_boxes)
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
        dn_meta = outputs.get("dn_meta")
        # Published: dn losses only in training mode, and only when the model split off dn queries.
        has_dn = (
            self.training
            and dn_meta is not None
            and "output_known_lbs_bboxes" in dn_meta
            and dn_meta["pad_size"] > 0
            and any(len(t["labels"]) for t in targets)
        )
        if not has_dn:
            # The published code puts these zeros on 'cuda'; they belong on the outputs' device.
            zero = torch.zeros((), device=outputs["pred_logits"].device)
            names = [name for loss in self.losses for name in _UNLOGGED_NAMES.get(loss, ())]
            losses.update({f"{name}{suffix}": zero.clone() for suffix in suffixes for name in names})
            return losses
        num_groups = dn_meta["num_dn_group"]
        indices = dn_positive_indices(targets, dn_meta["pad_size"], num_groups)
        known = dn_meta["output_known_lbs_bboxes"]
        dn_outputs = [known, *known.get("aux_outputs", [])]
        if len(dn_outputs) != len(suffixes):
            raise ValueError(f"DINOCriterion: {len(dn_outputs) - 1} dn aux outputs but {len(suffixes) - 1} aux outputs")
        for suffix, dn_out in zip(suffixes, dn_outputs):
            losses.update(self._output_losses(dn_out, targets, indices, num_boxes * num_groups, suffix))
        return losses


def build_dino_weight_dict(settings: DINOSettings) -> dict[str, float]:
    """Published DINO loss weights (39 entries for 6 decoder layers).

    dn weights (``_dn``) equal the main ones; aux copies ``_i`` include the dn weights; ``_interm`` weights are the
    main ones x interm_loss_coef (box terms x 0 with no_interm_box_loss).
    """
    main = {"loss_ce": settings.cls_loss_coef, "loss_bbox": settings.bbox_loss_coef,
            "loss_giou": settings.giou_loss_coef}  # fmt: skip
    weight_dict = expand_weight_dict(main, ["_dn"])
    if settings.aux_loss:
        weight_dict = expand_weight_dict(weight_dict, [f"_{i}" for i in range(settings.dec_layers - 1)])
    box_coef = 0.0 if settings.no_interm_box_loss else 1.0
    factors = {"loss_ce": 1.0, "loss_bbox": box_coef, "loss_giou": box_coef}
    weight_dict.update({f"{k}_interm": v * settings.interm_loss_coef * factors[k] for k, v in main.items()})
    return weight_dict


def build_dino_criterion(settings: DINOSettings, num_classes: int) -> DINOCriterion:
    """DINOCriterion of the published recipe (losses labels, boxes, cardinality; no masks).

    The matcher's focal alpha follows --focal_alpha, as the loss's does (published DINO; Deformable DETR's matcher
    keeps 0.25). The caller moves it to the device.
    """
    return DINOCriterion(
        num_classes,
        matcher=build_matcher(settings, class_cost="focal", focal_alpha=settings.focal_alpha, giou_eps=DINO_GIOU_EPS),
        weight_dict=build_dino_weight_dict(settings),
        losses=["labels", "boxes", "cardinality"],
        focal_alpha=settings.focal_alpha,
    )
