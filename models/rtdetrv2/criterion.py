"""RT-DETRv2's set criterion: varifocal classification loss (VFL) + L1 / GIoU boxes, on every output.

VFL (Zhang et al. 2021, VarifocalNet): the class target of a matched query is its box IoU with the ground truth
(detached), so the score learns localisation quality; unmatched classes are weighted by alpha p^gamma (focal-style
down-weighting of easy negatives). The main output, every auxiliary layer and the encoder's selected queries get
their own Hungarian matching; the denoising layers are supervised on their positive slots, paired with the targets
they were made from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from models.matcher import HungarianMatcher
from util.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou

__all__ = ["RTDETRCriterionv2", "rtdetr_weight_dict"]

Indices = list[tuple[Tensor, Tensor]]


def rtdetr_weight_dict(num_layers: int, vfl: float = 1.0, bbox: float = 5.0, giou: float = 2.0) -> dict[str, float]:
    """Weights of every loss key: main, ``_aux_{i}`` (i < L-1), ``_enc_0``, ``_dn_{i}`` (i < L): 3 (2L + 1) keys."""
    base = {"loss_vfl": vfl, "loss_bbox": bbox, "loss_giou": giou}
    suffixes = ["", *(f"_aux_{i}" for i in range(num_layers - 1)), "_enc_0", *(f"_dn_{i}" for i in range(num_layers))]
    return {f"{name}{suffix}": weight for suffix in suffixes for name, weight in base.items()}


def _src_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def _pair_iou_giou(src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and GIoU of matched cxcywh pairs [N, 4], [N, 4] -> [N], [N] (published: no epsilon)."""
    a, b = box_cxcywh_to_xyxy(src)[:, None], box_cxcywh_to_xyxy(tgt)[:, None]
    return box_iou(a, b)[0].view(-1), generalized_box_iou(a, b).view(-1)


class RTDETRCriterionv2(nn.Module):
    """Losses loss_vfl, loss_bbox, loss_giou of every output, UNWEIGHTED; ``weight_dict`` holds the weights.

    Args:
        matcher: focal-cost Hungarian matcher (cost 2 class, 5 L1, 2 GIoU).
        weight_dict: key -> weight (see :func:`rtdetr_weight_dict`); the weighted sum is the published loss.
        num_classes: K.
        alpha, gamma: of the VFL negative weight alpha p^gamma (published 0.75, 2).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        num_classes: int = 80,
        alpha: float = 0.75,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.matcher, self.weight_dict, self.num_classes = matcher, weight_dict, num_classes
        self.alpha, self.gamma = alpha, gamma

    def loss_vfl(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float) -> Tensor:
        """sum over queries and classes of BCE(x, t; w) / num_boxes, t = one-hot * IoU (detached),
        w = alpha sigmoid(x)^gamma (1 - one-hot) + t (sigmoid detached)."""
        logits = outputs["pred_logits"].float()
        idx = _src_idx(indices)
        src_boxes = outputs["pred_boxes"][idx].float()
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)
        iou = _pair_iou_giou(src_boxes, tgt_boxes)[0].detach()
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        score[idx] = iou.to(score.dtype)
        target = score[..., None] * onehot
        weight = self.alpha * logits.sigmoid().detach().pow(self.gamma) * (1 - onehot) + target
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        # Published reduction (mean over queries, sum, times Q): the sum up to float rounding.
        return loss.mean(1).sum() * logits.shape[1] / num_boxes

    def loss_boxes(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float):
        """(L1 sum, sum of 1 - GIoU) of the matched normalised cxcywh boxes, each / num_boxes."""
        src = outputs["pred_boxes"][_src_idx(indices)].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        giou = _pair_iou_giou(src, tgt)[1]
        return F.l1_loss(src, tgt, reduction="none").sum() / num_boxes, (1 - giou).sum() / num_boxes

    def _losses(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float, suffix: str):
        bbox, giou = self.loss_boxes(outputs, targets, indices, num_boxes)
        vfl = self.loss_vfl(outputs, targets, indices, num_boxes)
        return {f"loss_vfl{suffix}": vfl, f"loss_bbox{suffix}": bbox, f"loss_giou{suffix}": giou}

    @staticmethod
    def dn_indices(dn_meta: dict, targets: Sequence[dict]) -> Indices:
        """(positive dn slots, target index) per image: group g's positive j is paired with target j."""
        groups = dn_meta["dn_num_group"]
        pairs = []
        for positives, target in zip(dn_meta["dn_positive_idx"], targets):
            n = len(target["labels"])
            gt = torch.arange(n, dtype=torch.int64, device=positives.device).repeat(groups)
            if len(positives) != len(gt):
                raise ValueError(f"dn_meta: {len(positives)} positive slots for {n} targets x {groups} groups")
            pairs.append((positives.long(), gt))
        return pairs

    @staticmethod
    def _num_boxes(targets: Sequence[dict], device: torch.device) -> float:
        """Targets per process averaged over processes, at least 1."""
        total = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            world = dist.get_world_size()
        return max(total.item() / world, 1.0)

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """All losses.

        Args:
            outputs: the model's output ('pred_logits' [B, K, C], 'pred_boxes' [B, K, 4] normalised cxcywh; in
                training also 'aux_outputs', 'enc_aux_outputs', 'dn_aux_outputs' + 'dn_meta').
            targets: B dicts 'labels' [T] int64 in [0, C), 'boxes' [T, 4] normalised cxcywh.

        Returns:
            key -> unweighted scalar: loss_vfl / loss_bbox / loss_giou with suffixes '', '_aux_{i}', '_enc_{i}',
            '_dn_{i}' for the outputs present.
        """
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            named = [("", outputs)]
            named += [(f"_aux_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
            named += [(f"_enc_{i}", enc) for i, enc in enumerate(outputs.get("enc_aux_outputs", []))]
            if outputs.get("enc_meta", {}).get("class_agnostic"):
                raise ValueError("RTDETRCriterionv2: class-agnostic query selection is not supported")
            all_indices = self.matcher.match_layers([out for _, out in named], targets)
            num_boxes = self._num_boxes(targets, device)
            losses: dict[str, Tensor] = {}
            for (suffix, out), indices in zip(named, all_indices):
                losses.update(self._losses(out, targets, indices, num_boxes, suffix))
            if "dn_aux_outputs" in outputs:
                dn_meta = outputs["dn_meta"]
                indices = self.dn_indices(dn_meta, targets)
                dn_num_boxes = num_boxes * dn_meta["dn_num_group"]
                for i, dn_out in enumerate(outputs["dn_aux_outputs"]):
                    losses.update(self._losses(dn_out, targets, indices, dn_num_boxes, f"_dn_{i}"))
        return losses
