"""Hungarian matching of predictions to targets (DETR paper, section 3.1).

Cost of assigning query i to target j: ``cost_bbox * L1(box_i, box_j) + cost_class * class_ij
- cost_giou * GIoU(box_i, box_j)``, minimised per image by ``scipy.optimize.linear_sum_assignment``.
The class term is ``-softmax(logits)[class_j]`` for DETR and the focal cost of ``sigmoid(logits)[class_j]`` for
Deformable DETR and DINO (``class_cost="focal"``). The costs of every decoder layer and image of a step are built
on the device at once (one padded [L, B, Q, T_max] block per query count) and copied to the host in a single
transfer; only the solver runs per image.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["DINO_GIOU_EPS", "HungarianMatcher", "build_matcher", "focal_class_cost"]

Indices = list[tuple[Tensor, Tensor]]

# Deformable DETR and DINO fix the focal matching cost's parameters (independent of --focal_alpha).
_FOCAL_ALPHA = 0.25
_FOCAL_GAMMA = 2.0
# DINO's box_ops add 1e-6 to the IoU and GIoU denominators (DESIGN_DINO "Matcher").
DINO_GIOU_EPS = 1e-6


def focal_class_cost(logits: Tensor, alpha: float = _FOCAL_ALPHA) -> Tensor:
    """Focal matching cost of every class: [..., K] logits -> [..., K] (gather it at the target classes).

    ``alpha (1 - p)^g (-log(p + 1e-8)) - (1 - alpha) p^g (-log(1 - p + 1e-8))`` with p = sigmoid(logits),
    alpha 0.25 (default) and g 2: the focal loss of labelling the query positive minus that of labelling it negative.
    """
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** _FOCAL_GAMMA * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob**_FOCAL_GAMMA * -(1 - prob + 1e-8).log()
    return pos - neg


def _empty_match() -> tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


def _solve(cost) -> tuple[Tensor, Tensor]:
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one assignment between the queries and the targets of each image (no gradient).

    Args:
        cost_class: weight of the class cost.
        cost_bbox: weight of the L1 distance between normalised cxcywh boxes.
        cost_giou: weight of the (negated) generalised IoU.
        class_cost: "softmax" (DETR: -softmax probability; the logits end with a "no object" entry) or
            "focal" (Deformable DETR, DINO: ``focal_class_cost`` of sigmoid probabilities, no "no object" entry).
        giou_eps: None for DETR's GIoU; 1e-6 (``DINO_GIOU_EPS``) for DINO's (see ``util.box_ops``).
        focal_alpha: alpha of the focal class cost (0.25; RT-DETRv2 takes it from --focal_alpha).
    """

    def __init__(
        self,
        cost_class: float = 1,
        cost_bbox: float = 1,
        cost_giou: float = 1,
        class_cost: str = "softmax",
        giou_eps: float | None = None,
        focal_alpha: float = _FOCAL_ALPHA,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: set_cost_class, set_cost_bbox and set_cost_giou cannot all be 0")
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"HungarianMatcher: class_cost must be 'softmax' or 'focal', got {class_cost!r}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost
        self.giou_eps = giou_eps
        self.focal_alpha = focal_alpha

    def _num_classes(self, num_logits: int) -> int:
        return num_logits - 1 if self.class_cost == "softmax" else num_logits

    def _class_cost(self, logits: Tensor) -> Tensor:
        """[..., K(+1)] float32 logits -> [..., K(+1)] cost of assigning each class."""
        return -logits.softmax(-1) if self.class_cost == "softmax" else focal_class_cost(logits, self.focal_alpha)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Match one set of predictions.

        Args:
            outputs: 'pred_logits' [B, Q, K + 1] (softmax) or [B, Q, K] (focal), 'pred_boxes' [B, Q, 4]
                normalised cxcywh.
            targets: B dicts with 'labels' int64 [T_b] and 'boxes' [T_b, 4] normalised cxcywh.

        Returns:
            B pairs (query indices, target indices), int64 [min(Q, T_b)] each, sorted by query index.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, layer_outputs: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> list[Indices]:
        """Match several outputs (e.g. the final output, every auxiliary output, DINO's encoder output) in one pass.

        Args:
            layer_outputs: L dicts shaped like ``forward``'s ``outputs`` (same B and number of logits; the query
                count Q may differ between them).
            targets: as in ``forward``.

        Returns:
            list over layers of the per-image index pairs (``forward``'s result for each layer).
        """
        if not layer_outputs:
            return []
        batch = layer_outputs[0]["pred_logits"].shape[0]
        sizes = self._check_sizes(targets, batch, min(out["pred_logits"].shape[1] for out in layer_outputs))
        t_max = max(sizes, default=0)
        if t_max == 0:
            return [[_empty_match() for _ in range(batch)] for _ in layer_outputs]
        # Outputs with the same query count share one stacked cost block.
        groups: dict[int, list[int]] = {}
        for i, out in enumerate(layer_outputs):
            groups.setdefault(out["pred_logits"].shape[1], []).append(i)
        device = layer_outputs[0]["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            # Targets packed into padded [B, T_max] blocks with one scatter (positions computed on the host).
            flat = torch.cat([torch.arange(n) + b * t_max for b, n in enumerate(sizes)]).to(device, non_blocking=True)
            tgt_ids = torch.zeros(batch * t_max, dtype=torch.int64, device=device)
            tgt_ids[flat] = torch.cat([t["labels"] for t in targets]).to(device, torch.int64)
            # Padding columns get a valid dummy box so they stay finite; they are cut off before solving.
            tgt_boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(batch * t_max, 1)
            tgt_boxes[flat] = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)
            valid = torch.zeros(batch * t_max, dtype=torch.bool, device=device)
            valid[flat] = True
            num_classes = self._num_classes(layer_outputs[0]["pred_logits"].shape[-1])
            flags, costs, shapes = [], [], []
            for members in groups.values():
                logits = torch.stack([layer_outputs[i]["pred_logits"] for i in members])
                boxes = torch.stack([layer_outputs[i]["pred_boxes"] for i in members])
                flags.append(self._invalid_flags(logits, boxes, tgt_ids, tgt_boxes, valid, num_classes))
                ids = tgt_ids.clamp(0, logits.shape[-1] - 1).view(batch, t_max)
                costs.append(self._cost(logits.float(), boxes.float(), ids, tgt_boxes.view(batch, t_max, 4)).flatten())
                shapes.append(logits.shape[:3])
            flag = torch.stack(flags).any(0)
            host = torch.cat([flag.float(), *costs]).cpu()  # the single device-to-host copy
        self._raise_if_invalid(host[: flag.numel()], num_classes)
        indices: list[Indices] = [[] for _ in layer_outputs]
        offset = flag.numel()
        for members, shape in zip(groups.values(), shapes):
            cost_np = host[offset : offset + shape.numel() * t_max].view(*shape, t_max).numpy()
            offset += shape.numel() * t_max
            for layer, i in enumerate(members):
                indices[i] = [_solve(cost_np[layer, b, :, :n]) if n else _empty_match() for b, n in enumerate(sizes)]
        return indices

    def _cost(self, logits: Tensor, boxes: Tensor, tgt_ids: Tensor, tgt_boxes: Tensor) -> Tensor:
        """[L, B, Q, K(+1)], [L, B, Q, 4], [B, T], [B, T, 4] -> cost [L, B, Q, T] (float32)."""
        num_layers, batch, num_queries = logits.shape[:3]
        index = tgt_ids[None, :, None, :].expand(num_layers, batch, num_queries, -1)
        cost_class = self._class_cost(logits).gather(-1, index)
        # L1 by broadcasting: torch.cdist is much slower on GPU for these small blocks.
        cost_bbox = (boxes[:, :, :, None, :] - tgt_boxes[None, :, None, :, :]).abs().sum(-1)
        tgt_xyxy = box_cxcywh_to_xyxy(tgt_boxes)[None].expand(num_layers, -1, -1, -1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), tgt_xyxy, eps=self.giou_eps)
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @staticmethod
    def _check_sizes(targets: Sequence[dict[str, Tensor]], batch: int, num_queries: int) -> list[int]:
        if len(targets) != batch:
            raise ValueError(f"matcher: {batch} images of predictions but {len(targets)} target dicts")
        sizes = [len(t["labels"]) for t in targets]
        for b, (target, n) in enumerate(zip(targets, sizes)):
            if tuple(target["boxes"].shape) != (n, 4):
                raise ValueError(f"matcher: image {b} has {n} labels but boxes of shape {tuple(target['boxes'].shape)}")
            if n > num_queries:
                raise ValueError(
                    f"matcher: image {b} has {n} target boxes but the model has only {num_queries} queries; "
                    "raise --num_queries or drop boxes"
                )
        return sizes

    @staticmethod
    def _invalid_flags(
        logits: Tensor, boxes: Tensor, tgt_ids: Tensor, tgt_boxes: Tensor, valid: Tensor, num_classes: int
    ) -> Tensor:
        """Device-side checks as [4] bools, so they travel to the host with the costs in one copy."""
        return torch.stack(
            [
                ~(torch.isfinite(logits).all() & torch.isfinite(boxes).all()),
                ~torch.isfinite(tgt_boxes).all(),
                ((tgt_boxes[:, 2:] < 0).any(-1) & valid).any(),
                (((tgt_ids < 0) | (tgt_ids >= num_classes)) & valid).any(),
            ]
        )

    @staticmethod
    def _raise_if_invalid(flags: Tensor, num_classes: int) -> None:
        if flags[0]:
            raise ValueError(
                "matcher: predictions contain NaN or inf (diverged training? try a lower --lr, --clip_max_norm, "
                "or --amp off)"
            )
        if flags[1]:
            raise ValueError("matcher: target boxes contain NaN or inf")
        if flags[2]:
            raise ValueError(
                "matcher: target boxes have negative width or height (x1 < x0 or y1 < y0 after cxcywh->xyxy)"
            )
        if flags[3]:
            raise ValueError(
                f"matcher: target labels must be in [0, {num_classes}); set --num_classes above the largest category id"
            )

    @torch.no_grad()
    def match_per_image(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Reference matcher: one plain cost matrix and solver call per image (for tests and benchmarks)."""
        num_queries = outputs["pred_logits"].shape[1]
        indices = []
        for b, target in enumerate(targets):
            n = len(target["labels"])
            if n == 0:
                indices.append(_empty_match())
                continue
            if n > num_queries:
                raise ValueError(
                    f"matcher: image {b} has {n} target boxes but the model has only {num_queries} queries"
                )
            boxes = outputs["pred_boxes"][b].float()
            tgt_boxes = target["boxes"].float()
            cost_class = self._class_cost(outputs["pred_logits"][b].float())[:, target["labels"]]
            cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
            tgt_xyxy = box_cxcywh_to_xyxy(tgt_boxes)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), tgt_xyxy, eps=self.giou_eps)
            cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
            indices.append(_solve(cost.cpu().numpy()))
        return indices


def build_matcher(args: argparse.Namespace) -> HungarianMatcher:
    """HungarianMatcher with the --set_cost_class / --set_cost_bbox / --set_cost_giou weights.

    ``args.model`` (default "detr") picks the class cost: softmax for DETR, focal for "deformable_detr" and
    "dino"; DINO also gets its GIoU epsilon.
    """
    family = getattr(args, "model", "detr")
    return HungarianMatcher(
        cost_class=args.set_cost_class,
        cost_bbox=args.set_cost_bbox,
        cost_giou=args.set_cost_giou,
        class_cost="focal" if family in ("deformable_detr", "dino") else "softmax",
        giou_eps=DINO_GIOU_EPS if family == "dino" else None,
    )
