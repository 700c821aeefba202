"""DINO's contrastive denoising (CDN) queries (Zhang et al., ICLR 2023, section 3.3), and RT-DETR's variant.

During training, noised copies of the ground-truth boxes are fed to the decoder in front of the matching queries.
Each group holds one positive copy (small noise, to be reconstructed) and one negative copy (larger noise, to be
classified as background) of every target. A self-attention mask keeps the groups from seeing each other and keeps
the matching queries from seeing any of them, so the answer never leaks into the matching part.

Boxes are (cx, cy, w, h) normalised to [0, 1]; the dn reference boxes are returned unsigmoided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from models.box_refinement import DINO_EPS, inverse_sigmoid
from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

SetAuxLoss = Callable[[Tensor, Tensor], list[dict[str, Tensor]]]


def dn_group_count(dn_number: int, max_gt: int) -> int:
    """Number of denoising groups for ``dn_number`` and the most targets of one image.

    The published code doubles dn_number (positives and negatives) to G and, only when G >= 100, divides it by the
    2 * max_gt slots of a group, so the dn budget stays about G queries; below 100, G itself is the group count.
    Always at least 1, and 1 when no image has targets.
    """
    doubled = 2 * dn_number
    if max_gt == 0:
        return 1
    groups = doubled // (2 * max_gt) if doubled >= 100 else doubled
    return max(groups, 1)


def dn_attention_mask(pad_size: int, num_groups: int, num_queries: int, device: torch.device | None = None) -> Tensor:
    """Decoder self-attention mask for ``num_groups`` dn groups followed by the matching queries.

    Matching queries may not see any dn query; a dn query sees its own group (positives and negatives) and every
    matching query. The dn block comes from integer group ids instead of a Python loop over groups, and only that
    [pad_size, pad_size] block is compared: the Q matching rows and columns are constant.

    Returns:
        [pad_size + num_queries, pad_size + num_queries] bool, True = blocked (nn.MultiheadAttention's convention;
        SDPA wants the inverse).
    """
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // (pad_size // num_groups)
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def prepare_for_cdn(
    targets: Sequence[dict[str, Tensor]] | None,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_queries: int,
    num_classes: int,
    hidden_dim: int,
    label_enc: nn.Module,
    training: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, dict | None]:
    """Build the contrastive denoising queries of one batch.

    Group g of 2 * max_gt slots holds target j of image b at slot g * 2 * max_gt + j (positive) and
    g * 2 * max_gt + max_gt + j (negative); slots past an image's own targets stay zero (content and box).

    Label noise: each copy independently, with probability label_noise_ratio / 2, takes a uniform class in
    [0, num_classes) (possibly its own). Box noise: every xyxy corner moves by sign * m * half-size * box_noise_scale
    with sign = +-1 and m ~ U[0, 1) for positives, U[1, 2) for negatives, then the box is clamped to [0, 1].
    Global RNG draws, in this order: rand_like (flip), randint_like (new label), randint_like (sign), rand_like (m);
    the label draws are skipped when label_noise_ratio is 0 and the box draws when box_noise_scale is 0.

    Without targets in the whole batch the published code pads to zero dn queries; this returns all None instead so
    the model runs exactly as without denoising (and the dn losses are the zeros of a batch without a dn part).

    Args:
        targets: per image {"labels": [N_b] int64, "boxes": [N_b, 4] cxcywh in [0, 1]}, or None.
        dn_number: the dn_number flag (100 in DINO's configs); <= 0 disables denoising.
        label_noise_ratio: twice the probability of a label flip.
        box_noise_scale: noise amplitude as a fraction of the half box size.
        num_queries: number of matching queries Q that follow the dn queries.
        num_classes: labels are drawn from [0, num_classes) (dn_labelbook_size).
        hidden_dim: width D of the content queries.
        label_enc: embedding from labels to [D] content vectors (nn.Embedding(num_classes + 1, D)).
        training: False returns all None.

    Returns:
        input_query_label [B, pad_size, D], input_query_bbox [B, pad_size, 4] (unsigmoided cxcywh),
        attn_mask [pad_size + Q, pad_size + Q] bool True = blocked, and dn_meta {"pad_size", "num_dn_group"};
        or four None when there is nothing to denoise.
    """
    if not training or targets is None or dn_number <= 0:
        return None, None, None, None
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0:
        return None, None, None, None

    groups = dn_group_count(dn_number, max_gt)
    copies = 2 * groups
    labels = torch.cat([t["labels"] for t in targets]).long()
    boxes = torch.cat([t["boxes"] for t in targets])
    device = boxes.device
    num_targets = labels.numel()

    # Copy-major layout (copy k = 2 * group + is_negative, then all targets of the batch) as in the published code,
    # so a seed gives the same noise.
    dn_labels = labels.repeat(copies)
    dn_boxes = boxes.repeat(copies, 1)
    if label_noise_ratio > 0:
        flip = torch.rand_like(dn_labels.float()) < label_noise_ratio * 0.5
        chosen = flip.nonzero().view(-1)
        new_labels = torch.randint_like(chosen, 0, num_classes)
        dn_labels = dn_labels.scatter(0, chosen, new_labels)
    if box_noise_scale > 0:
        half_size = dn_boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint_like(dn_boxes, 0, 2) * 2.0 - 1.0
        is_negative = (torch.arange(copies, device=device) % 2).repeat_interleave(num_targets)
        magnitude = torch.rand_like(dn_boxes) + is_negative[:, None]
        corners = box_cxcywh_to_xyxy(dn_boxes) + magnitude * sign * half_size * box_noise_scale
        dn_boxes = box_xyxy_to_cxcywh(corners.clamp(min=0.0, max=1.0))

    content = label_enc(dn_labels)
    # DINO's clamp (1e-3, not Deformable DETR's 1e-5) bounds the references of boxes squeezed against the border.
    unsigmoid_boxes = inverse_sigmoid(dn_boxes, DINO_EPS)

    image = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)]).to(device)
    within = torch.cat([torch.arange(n) for n in counts]).to(device)
    slot = (torch.arange(copies, device=device)[:, None] * max_gt + within[None, :]).view(-1)
    image = image.repeat(copies)

    pad_size = copies * max_gt
    batch = len(targets)
    input_query_label = content.new_zeros(batch, pad_size, hidden_dim)
    input_query_label[image, slot] = content
    input_query_bbox = unsigmoid_boxes.new_zeros(batch, pad_size, 4)
    input_query_bbox[image, slot] = unsigmoid_boxes

    attn_mask = dn_attention_mask(pad_size, groups, num_queries, device)
    dn_meta = {"pad_size": pad_size, "num_dn_group": groups}
    return input_query_label, input_query_bbox, attn_mask, dn_meta


def dn_post_process(
    outputs_class: Tensor,
    outputs_coord: Tensor,
    dn_meta: dict | None,
    aux_loss: bool,
    set_aux_loss: SetAuxLoss,
) -> tuple[Tensor, Tensor]:
    """Split the dn queries off the decoder outputs.

    Writes dn_meta["output_known_lbs_bboxes"] = {"pred_logits": [B, pad, K], "pred_boxes": [B, pad, 4] of the last
    layer, plus "aux_outputs" = set_aux_loss(dn logits, dn boxes) for layers 0..L-2 when aux_loss}.

    Args:
        outputs_class: [L, B, pad + Q, K] logits of every decoder layer.
        outputs_coord: [L, B, pad + Q, 4] boxes of every decoder layer.
        dn_meta: prepare_for_cdn's dn_meta, or None (outputs returned unchanged).
        aux_loss: whether to add the intermediate layers.
        set_aux_loss: [L, B, pad, K], [L, B, pad, 4] -> list of L - 1 {"pred_logits", "pred_boxes"} dicts.

    Returns:
        The matching part: [L, B, Q, K] and [L, B, Q, 4].
    """
    if not dn_meta or dn_meta["pad_size"] <= 0:
        return outputs_class, outputs_coord
    pad_size = dn_meta["pad_size"]
    dn_class, dn_coord = outputs_class[:, :, :pad_size], outputs_coord[:, :, :pad_size]
    known: dict = {"pred_logits": dn_class[-1], "pred_boxes": dn_coord[-1]}
    if aux_loss:
        known["aux_outputs"] = set_aux_loss(dn_class, dn_coord)
    dn_meta["output_known_lbs_bboxes"] = known
    return outputs_class[:, :, pad_size:], outputs_coord[:, :, pad_size:]


def prepare_for_rtdetr_cdn(
    targets: Sequence[dict[str, Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, dict | None]:
    """RT-DETR's contrastive denoising queries (DINO's scheme with RT-DETR's layout, group count and RNG order).

    Differences from :func:`prepare_for_cdn`: groups = num_denoising // max_gt (at least 1); the noise is drawn
    image-major over every slot of the padded [B, 2 * groups * max_gt] layout (padding slots included); a flipped
    label is drawn from [0, num_classes) for every slot and used where the slot holds a target; padding slots keep
    class num_classes (the embedding's zero padding row) and box 0. A batch without boxes gets one group of one
    dummy target (box 0.5 0.5 0.1 0.1, class num_classes, never positive), so the graph keeps the dn part.
    Global RNG draws, in order: rand_like (flip, p = label_noise_ratio / 2), randint_like (new class, int32),
    randint_like (sign), rand_like (magnitude m, +1 for negatives); corners move by sign * m * (w/2, h/2) *
    box_noise_scale, are clipped to [0, 1] and the boxes are unsigmoided (eps 1e-5).

    Args:
        targets: per image {"labels": [N_b] int64 in [0, num_classes), "boxes": [N_b, 4] cxcywh in [0, 1]}.
        num_classes: K; also the padding class.
        num_queries: matching queries Q that follow the dn queries.
        class_embed: nn.Embedding(K + 1, D, padding_idx=K).
        num_denoising: dn query budget (<= 0: no denoising, four None).

    Returns:
        content [B, n_dn, D], reference logits [B, n_dn, 4] (unsigmoided cxcywh), attn_mask [n_dn + Q, n_dn + Q]
        bool (True = blocked), dn_meta {"dn_positive_idx": per image int64 [groups * N_b] slot indices of the
        positives, group-major; "dn_num_group"; "dn_num_split": [n_dn, Q]}.
    """
    if num_denoising <= 0:
        return None, None, None, None
    counts = [len(t["labels"]) for t in targets]
    device = targets[0]["labels"].device
    max_gt = max(counts)
    empty = max_gt == 0
    max_gt = max(max_gt, 1)
    groups = 1 if empty else max(num_denoising // max_gt, 1)
    batch = len(counts)

    labels = torch.full([batch, max_gt], num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros([batch, max_gt, 4], device=device)
    is_target = torch.zeros([batch, max_gt], dtype=torch.bool, device=device)
    if empty:
        boxes[..., :2], boxes[..., 2:] = 0.5, 0.1
    for b, (target, n) in enumerate(zip(targets, counts)):
        labels[b, :n] = target["labels"].to(torch.int32)
        boxes[b, :n] = target["boxes"]
        is_target[b, :n] = True
    labels = labels.tile([1, 2 * groups])
    boxes = boxes.tile([1, 2 * groups, 1])
    is_target = is_target.tile([1, 2 * groups])
    negative = torch.zeros([batch, 2 * max_gt, 1], device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile([1, groups, 1])
    positive_idx = torch.nonzero((1 - negative.squeeze(-1)) * is_target)[:, 1]
    dn_positive_idx = list(positive_idx.split([n * groups for n in counts]))
    num_dn = 2 * groups * max_gt

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < label_noise_ratio * 0.5
        new_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
        labels = torch.where(flip & is_target, new_labels, labels)
    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half = boxes[..., 2:].mul(0.5).tile([1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(boxes)
        part = (part + 1.0) * negative + part * (1 - negative)
        boxes = box_xyxy_to_cxcywh((corners + sign * part * half).clip(min=0.0, max=1.0))
    ref_logits = inverse_sigmoid(boxes)
    content = class_embed(labels)
    attn_mask = dn_attention_mask(num_dn, groups, num_queries, device)
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": groups, "dn_num_split": [num_dn, num_queries]}
    return content, ref_logits, attn_mask, dn_meta
