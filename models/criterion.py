"""DETR set-prediction loss (paper section 3.1 and appendix A.2).

After Hungarian matching, matched queries are supervised with their target's class and box, unmatched
ones with "no object". Every loss is computed in float32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

from util.box_ops import box_cxcywh_to_xyxy, check_boxes_xyxy, elementwise_generalized_box_iou

from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "class_error", "dice_loss", "expand_weight_dict", "place_criterion", "sigmoid_focal_loss"]

Indices = list[tuple[Tensor, Tensor]]


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Soft dice loss: [N, P] mask logits, [N, P] binary targets -> sum over masks / num_boxes."""
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2
) -> Tensor:
    """Focal loss (Lin et al. 2017): [N, P] logits, [N, P] targets -> mean over pixels, sum over masks / num_boxes."""
    loss = _tv_sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_boxes


def expand_weight_dict(base: Mapping[str, float], suffixes: Sequence[str]) -> dict[str, float]:
    """``base`` followed by a copy of it for every suffix, suffix-major: ``{name + suffix: weight}`` (the loss
    names of auxiliary, encoder or denoising outputs)."""
    expanded = dict(base)
    for suffix in suffixes:
        expanded.update({f"{name}{suffix}": weight for name, weight in base.items()})
    return expanded


def place_criterion(criterion: nn.Module, device_name: str) -> nn.Module:
    """Move the criterion to ``device_name`` when that device exists here (else it stays on the CPU)."""
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return criterion
    if device.type == "mps" and not torch.backends.mps.is_available():
        return criterion
    return criterion.to(device)


def _src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def _matched_classes(targets: Sequence[dict[str, Tensor]], indices: Indices, device: torch.device) -> Tensor:
    """Class of the target of every matched prediction, in ``_src_permutation_idx`` order -> int64 [N]."""
    return torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(device)


@torch.no_grad()
def class_error(matched_logits: Tensor, matched_classes: Tensor) -> Tensor:
    """100 - top-1 accuracy (%) of the matched queries: [N, C] logits, [N] classes -> scalar (100 when N = 0)."""
    if matched_classes.numel() == 0:
        return torch.full((), 100.0, device=matched_logits.device)  # published convention: accuracy 0
    return 100 - (matched_logits.argmax(-1) == matched_classes).float().mean() * 100


def _padded_target_masks(targets: Sequence[dict[str, Tensor]], indices: Indices) -> Tensor:
    """Matched target masks, zero-padded bottom/right to the batch's largest mask size -> [N, H, W] float."""
    masks = [t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)]
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    return torch.cat([F.pad(m.float(), (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks])


class SetCriterion(nn.Module):
    """Hungarian-matched DETR losses, with copies for every auxiliary decoder output.

    Subclasses (``FocalSetCriterion``, ``DINOCriterion``) replace ``loss_labels`` and add outputs through
    ``_named_outputs`` and ``_extra_losses``.

    Args:
        num_classes: K, object classes (the logits have K + 1 entries; index K is "no object").
        matcher: assigns queries to targets.
        weight_dict: loss name -> weight (applied by the training loop, not here).
        eos_coef: cross-entropy weight of the "no object" class (None: unweighted, no ``empty_weight`` buffer).
        losses: any of 'labels', 'cardinality', 'boxes', 'masks'.
    """

    # ``+ eps`` of the GIoU loss denominators (torchvision's default; DINO overrides it).
    giou_eps: float = 1e-7

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float | None,
        losses: Sequence[str],
    ):
        super().__init__()
        unknown = set(losses) - {"labels", "cardinality", "boxes", "masks"}
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        if eos_coef is not None:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight)

    def loss_labels(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float, log: bool = True
    ) -> dict[str, Tensor]:
        """loss_ce: class-weighted cross-entropy over all B*Q queries (weighted mean, as published).

        With ``log``, also class_error: 100 - top-1 accuracy (%) of the matched queries.
        """
        logits = outputs["pred_logits"].float()
        idx = _src_permutation_idx(indices)
        matched_classes = _matched_classes(targets, indices, logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        weight = self.empty_weight.to(logits.device) if self.eos_coef is not None else None
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, weight)}
        if log:
            losses["class_error"] = class_error(logits[idx], matched_classes)
        return losses

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """cardinality_error: mean |#predictions not "no object" - #targets| per image (logged, no gradient).

        "No object" is the last logit; with focal-loss logits that is a real class (a published leftover, kept).
        """
        logits = outputs["pred_logits"]
        num_targets = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.float32, device=logits.device)
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(num_predicted, num_targets)}

    def loss_boxes(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """loss_bbox: L1 of matched normalised cxcywh boxes; loss_giou: 1 - GIoU; both summed / num_boxes."""
        src_boxes, target_boxes = self._matched_boxes(outputs, targets, indices)
        target_xyxy = box_cxcywh_to_xyxy(target_boxes)
        check_boxes_xyxy(target_xyxy, f"{type(self).__name__} target 'boxes' (normalised cx, cy, w, h)")
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), target_xyxy, eps=self.giou_eps)
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    @staticmethod
    def _matched_boxes(outputs: dict, targets: Sequence[dict], indices: Indices) -> tuple[Tensor, Tensor]:
        """(predicted, target) normalised cxcywh boxes of the matched pairs, float32 [N, 4] each."""
        src_boxes = outputs["pred_boxes"][_src_permutation_idx(indices)].float()
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(src_boxes)
        return src_boxes, target_boxes

    def loss_masks(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """loss_mask (sigmoid focal) and loss_dice of matched masks, upsampled to the padded target size."""
        src_masks = outputs["pred_masks"][_src_permutation_idx(indices)].float()
        target_masks = _padded_target_masks(targets, indices).to(src_masks.device)
        src_masks = F.interpolate(
            src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear", align_corners=False
        )
        src_masks = src_masks[:, 0].flatten(1)
        target_masks = target_masks.flatten(1)
        return {
            "loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes),
            "loss_dice": dice_loss(src_masks, target_masks, num_boxes),
        }

    def get_loss(self, loss: str, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float, **kwargs):
        """Compute the named loss ('labels', 'cardinality', 'boxes' or 'masks')."""
        compute = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
            "masks": self.loss_masks,
        }
        if loss not in compute:
            raise ValueError(f"{type(self).__name__}: unknown loss {loss!r}")
        return compute[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _num_boxes(self, targets: Sequence[dict], device: torch.device) -> float:
        """Target boxes per process, averaged over processes, at least 1."""
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        if dist.is_available() and dist.is_initialized():
            total = torch.tensor([num_boxes], dtype=torch.float32, device=device)
            dist.all_reduce(total)
            num_boxes = total.item() / dist.get_world_size()
        return max(num_boxes, 1.0)

    def _match(self, layer_outputs: Sequence[dict], targets: Sequence[dict]) -> list[Indices]:
        # All outputs matched in one pass: one device-to-host copy per step.
        if hasattr(self.matcher, "match_layers"):
            return self.matcher.match_layers(layer_outputs, targets)
        return [self.matcher(out, targets) for out in layer_outputs]  # any matcher with the published signature

    def _output_losses(
        self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float, suffix: str = ""
    ) -> dict[str, Tensor]:
        """Every loss of one output, names + ``suffix``; only the main output (suffix "") logs and has masks."""
        losses: dict[str, Tensor] = {}
        for loss in self.losses:
            if suffix and loss == "masks":  # too costly for every layer (published choice)
                continue
            kwargs = {"log": False} if suffix and loss == "labels" else {}
            values = self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs)
            losses.update({f"{name}{suffix}": value for name, value in values.items()})
        return losses

    def _named_outputs(self, outputs: dict) -> list[tuple[str, dict]]:
        """(name suffix, output) of everything matched against the targets: main first, then aux ``_i``."""
        return [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]

    def _extra_losses(self, outputs: dict, targets: Sequence[dict], num_boxes: float) -> dict[str, Tensor]:
        """Losses of outputs matched differently from ``_named_outputs`` (none for DETR)."""
        return {}

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """All losses of the final output and (suffix _i) of each auxiliary output.

        Args:
            outputs: the model's output dict ('pred_logits' [B, Q, K+1], 'pred_boxes' [B, Q, 4] normalised
                cxcywh, optional 'pred_masks' [B, Q, h, w] and 'aux_outputs').
            targets: B dicts with 'labels' [T_b], 'boxes' [T_b, 4] normalised cxcywh, ('masks' [T_b, H, W]).

        Returns:
            loss name -> scalar tensor (unweighted; see ``weight_dict``).
        """
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            named = self._named_outputs(outputs)
            all_indices = self._match([out for _, out in named], targets)
            num_boxes = self._num_boxes(targets, device)
            losses: dict[str, Tensor] = {}
            for (suffix, out), indices in zip(named, all_indices):
                losses.update(self._output_losses(out, targets, indices, num_boxes, suffix))
            losses.update(self._extra_losses(outputs, targets, num_boxes))
        return losses
