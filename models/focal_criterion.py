"""Deformable DETR set-prediction loss: DETR's SetCriterion with a sigmoid focal classification loss.

There is no "no object" class: every query has K independent sigmoid logits; unmatched queries are supervised
with all-zero targets. Two-stage models also supervise the encoder proposals (``enc_outputs``, suffix ``_enc``)
as class-agnostic boxes: they are matched and classified with every target label set to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .criterion import SetCriterion, _matched_classes, _src_permutation_idx, class_error, sigmoid_focal_loss
from .matcher import HungarianMatcher

__all__ = ["FocalSetCriterion"]

Indices = list[tuple[Tensor, Tensor]]


class FocalSetCriterion(SetCriterion):
    """Hungarian-matched Deformable DETR losses: focal loss_ce, L1/GIoU boxes, aux ``_i`` and two-stage ``_enc``.

    Args:
        num_classes: K, object classes (the logits have K entries, no "no object" class).
        matcher: assigns queries to targets (``HungarianMatcher(class_cost="focal")``).
        weight_dict: loss name -> weight (applied by the training loop, not here).
        losses: any of 'labels', 'cardinality', 'boxes', 'masks'.
        focal_alpha: alpha of the focal classification loss (gamma is 2).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: Sequence[str],
        focal_alpha: float = 0.25,
    ):
        super().__init__(num_classes, matcher, weight_dict, eos_coef=None, losses=losses)
        self.focal_alpha = focal_alpha

    def loss_labels(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float, log: bool = True
    ) -> dict[str, Tensor]:
        """loss_ce: sigmoid focal loss on one-hot targets, summed over all queries and classes / num_boxes.

        With ``log``, also class_error: 100 - top-1 accuracy (%) of the matched queries.
        """
        logits = outputs["pred_logits"].float()  # [B, Q, K]
        idx = _src_permutation_idx(indices)
        matched_classes = _matched_classes(targets, indices, logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        # One extra column takes the unmatched queries and is cut off: they get all-zero targets.
        onehot = torch.zeros((*logits.shape[:2], self.num_classes + 1), dtype=logits.dtype, device=logits.device)
        onehot = onehot.scatter_(2, target_classes.unsqueeze(-1), 1)[:, :, :-1]
        # Published reduction: mean over queries, sum over batch and classes, / num_boxes, then x Q, i.e. the sum
        # over all elements / num_boxes up to float rounding (kept in this order to reproduce the numbers).
        loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2) * logits.shape[1]
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = class_error(logits[idx], matched_classes)
        return losses

    def _extra_losses(self, outputs: dict, targets: Sequence[dict], num_boxes: float) -> dict[str, Tensor]:
        """``_enc`` losses of the two-stage encoder proposals, matched against class-agnostic (label 0) targets."""
        losses = super()._extra_losses(outputs, targets, num_boxes)
        enc_outputs = outputs.get("enc_outputs")
        if isinstance(enc_outputs, dict):
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            indices = self._match([enc_outputs], bin_targets)[0]
            losses.update(self._output_losses(enc_outputs, bin_targets, indices, num_boxes, "_enc"))
        return losses
