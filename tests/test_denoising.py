"""DINO contrastive denoising: group count, slot layout, noise bounds and rates, attention mask, post-processing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from models.denoising import (
    dn_attention_mask,
    dn_group_count,
    dn_post_process,
    prepare_for_cdn,
)
from util.box_ops import box_cxcywh_to_xyxy

NUM_CLASSES = 7
HIDDEN = 16
NUM_QUERIES = 5


def make_targets(counts: list[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Small boxes well inside the image (centres in [0.3, 0.7], sizes in [0.02, 0.1]): no clamping at scale <= 1."""
    targets = []
    for n in counts:
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=generator, dtype=dtype)
        sizes = 0.02 + 0.08 * torch.rand(n, 2, generator=generator, dtype=dtype)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], dim=1)})
    return targets


def make_label_enc() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(NUM_CLASSES + 1, HIDDEN)


def run_cdn(targets, dn_number=100, label_noise_ratio=0.5, box_noise_scale=0.4, label_enc=None, training=True):
    return prepare_for_cdn(
        targets,
        dn_number=dn_number,
        label_noise_ratio=label_noise_ratio,
        box_noise_scale=box_noise_scale,
        num_queries=NUM_QUERIES,
        num_classes=NUM_CLASSES,
        hidden_dim=HIDDEN,
        label_enc=label_enc if label_enc is not None else make_label_enc(),
        training=training,
    )


def decode_labels(content: Tensor, label_enc: nn.Embedding) -> Tensor:
    """[B, P, D] content -> [B, P] the label whose embedding row it equals exactly, -1 for an all-zero slot."""
    equal = (content[:, :, None, :] == label_enc.weight[None, None]).all(-1)  # [B, P, K + 1]
    assert (equal.sum(-1) <= 1).all()
    return torch.where(equal.any(-1), equal.float().argmax(-1), torch.full_like(equal[..., 0], -1, dtype=torch.long))


def slot_index(group: int, j: int, max_gt: int, negative: bool) -> int:
    return group * 2 * max_gt + j + (max_gt if negative else 0)


def brute_force_mask(pad_size: int, groups: int, num_queries: int) -> Tensor:
    """The mask rules one entry at a time: True = query i may not attend key k."""
    size = pad_size + num_queries
    group_size = pad_size // groups
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        for k in range(size):
            query_dn, key_dn = i < pad_size, k < pad_size
            if not query_dn and key_dn:
                mask[i, k] = True
            elif query_dn and key_dn and i // group_size != k // group_size:
                mask[i, k] = True
    return mask


def loop_mask(pad_size: int, groups: int, num_queries: int) -> Tensor:
    """The straightforward construction, one block slice per group (the reference for the timing comparison)."""
    size = pad_size + num_queries
    group_size = pad_size // groups
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[pad_size:, :pad_size] = True
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        mask[rows, : g * group_size] = True
        mask[rows, (g + 1) * group_size : pad_size] = True
    return mask


@pytest.mark.parametrize(
    ("dn_number", "max_gt", "expected"),
    [
        (100, 3, 33),  # the contract's example: 200 // 6
        (100, 1, 100),
        (100, 2, 50),
        (100, 7, 14),
        (100, 101, 1),  # 200 // 202 = 0 -> at least 1
        (100, 150, 1),
        (100, 0, 1),
        (50, 4, 12),  # G = 100 is already divided
        (49, 4, 98),  # G = 98 < 100 is used as is
        (10, 30, 20),
        (1, 5, 2),
    ],
)
def test_group_count(dn_number: int, max_gt: int, expected: int) -> None:
    assert dn_group_count(dn_number, max_gt) == expected


@pytest.mark.parametrize(
    ("counts", "groups"), [([2, 3], 33), ([1], 100), ([1, 0], 100), ([120, 3], 1), ([4, 0, 2], 25)]
)
def test_shapes_and_meta_follow_group_count(counts: list[int], groups: int) -> None:
    targets = make_targets(counts, torch.Generator().manual_seed(1))
    label, box, mask, meta = run_cdn(targets)
    pad = groups * 2 * max(counts)
    assert meta == {"pad_size": pad, "num_dn_group": groups}
    assert label.shape == (len(counts), pad, HIDDEN)
    assert box.shape == (len(counts), pad, 4)
    assert mask.shape == (pad + NUM_QUERIES, pad + NUM_QUERIES) and mask.dtype == torch.bool


def test_contract_example_pad_198() -> None:
    _, _, mask, meta = run_cdn(make_targets([2, 3], torch.Generator().manual_seed(0)))
    assert meta["pad_size"] == 198 and meta["num_dn_group"] == 33
    assert mask.shape == (198 + NUM_QUERIES, 198 + NUM_QUERIES)


def test_slot_layout_without_noise() -> None:
    counts = [2, 0, 3]
    targets = make_targets(counts, torch.Generator().manual_seed(2))
    label_enc = make_label_enc()
    label, box, _, meta = run_cdn(targets, label_noise_ratio=0.0, box_noise_scale=0.0, label_enc=label_enc)
    max_gt, groups = 3, meta["num_dn_group"]
    decoded = decode_labels(label, label_enc)
    filled = torch.zeros(label.shape[:2], dtype=torch.bool)
    for b, t in enumerate(targets):
        for g in range(groups):
            for j in range(counts[b]):
                for negative in (False, True):
                    s = slot_index(g, j, max_gt, negative)
                    assert decoded[b, s] == t["labels"][j]
                    torch.testing.assert_close(box[b, s], t["boxes"][j].logit(), rtol=1e-6, atol=1e-6)
                    filled[b, s] = True
    # Every other slot (image 1 entirely, the third slot of image 0) is zero content and zero unsigmoid box.
    assert filled.sum() == 2 * groups * sum(counts)
    assert (label[~filled] == 0).all() and (box[~filled] == 0).all()
    assert (decoded[~filled] == -1).all()


def test_padding_slots_zero_with_noise() -> None:
    counts = [1, 4, 0]
    label, box, _, meta = run_cdn(make_targets(counts, torch.Generator().manual_seed(3)), box_noise_scale=1.0)
    max_gt = 4
    within = torch.arange(meta["pad_size"]) % max_gt  # position j inside the positive or negative half
    for b, n in enumerate(counts):
        empty = within >= n
        assert (label[b, empty] == 0).all() and (box[b, empty] == 0).all()
        assert (label[b, ~empty] != 0).any(-1).all() and (box[b, ~empty] != 0).any(-1).all()


def corner_shift_ratio(targets: list[dict], box: Tensor, counts: list[int], groups: int, scale: float):
    """|noised corner - original corner| / (scale * half-size) for every positive and negative copy: [M, 4] each."""
    max_gt = max(counts)
    positive, negative = [], []
    for b, t in enumerate(targets):
        original = box_cxcywh_to_xyxy(t["boxes"])
        half = t["boxes"][:, 2:].repeat(1, 2) / 2
        for g in range(groups):
            for j in range(counts[b]):
                for is_negative, out in ((False, positive), (True, negative)):
                    noised = box_cxcywh_to_xyxy(box[b, slot_index(g, j, max_gt, is_negative)].sigmoid())
                    out.append((noised - original[j]).abs() / (scale * half[j]))
    return torch.stack(positive), torch.stack(negative)


def test_box_noise_bounds() -> None:
    counts, scale = [3, 1, 5], 0.4
    torch.manual_seed(4)
    targets = make_targets(counts, torch.Generator().manual_seed(4), dtype=torch.float64)
    _, box, _, meta = run_cdn(targets, box_noise_scale=scale)
    positive, negative = corner_shift_ratio(targets, box, counts, meta["num_dn_group"], scale)
    tol = 1e-9
    assert positive.max() < 1 + tol
    assert negative.min() >= 1 - tol and negative.max() < 2 + tol
    # Not vacuous: the draws cover the ranges.
    assert positive.min() < 0.05 and positive.max() > 0.95
    assert negative.min() < 1.05 and negative.max() > 1.95


def test_box_noise_signs_both_ways() -> None:
    counts = [4]
    torch.manual_seed(5)
    targets = make_targets(counts, torch.Generator().manual_seed(5), dtype=torch.float64)
    _, box, _, meta = run_cdn(targets, box_noise_scale=0.4)
    noised = box_cxcywh_to_xyxy(box[0, : meta["pad_size"]].sigmoid())
    original = box_cxcywh_to_xyxy(targets[0]["boxes"]).repeat(2 * meta["num_dn_group"], 1)
    fraction_up = (noised > original).double().mean()
    assert 0.4 < fraction_up < 0.6


def test_box_noise_clamps_to_image() -> None:
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.02, 0.5, 0.04, 0.3], [0.9, 0.95, 0.2, 0.1]])}]
    torch.manual_seed(6)
    _, box, _, _ = run_cdn(targets, box_noise_scale=1.0)
    assert torch.isfinite(box).all()
    corners = box_cxcywh_to_xyxy(box[0].sigmoid())
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6
    # Boxes that left the image stop at its border: inverse_sigmoid with eps 1e-3 bounds the unsigmoided centre.
    bound = torch.log(torch.tensor(1 / 1e-3))
    assert box.abs().max() <= bound + 1e-5


def test_unsigmoid_uses_dino_eps() -> None:
    # Width 5e-4 < 1e-3 is floored to 1e-3; Deformable DETR's 1e-5 would give log(5e-4 / 0.9995) instead.
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.25, 5e-4, 0.9995]], dtype=torch.float64)}]
    _, box, _, _ = run_cdn(targets, box_noise_scale=0.0, label_noise_ratio=0.0)
    one_minus = 1 - torch.tensor([0.5, 0.25, 5e-4, 0.9995], dtype=torch.float64)
    expected = torch.log(torch.tensor([0.5, 0.25, 1e-3, 0.9995], dtype=torch.float64) / one_minus.clamp(min=1e-3))
    torch.testing.assert_close(box[0], expected.expand(box.shape[1], 4))


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_label_flip_rate(ratio: float) -> None:
    counts = [10, 6, 10, 3]
    label_enc = make_label_enc()
    torch.manual_seed(7)
    changed = total = 0
    new_labels = []
    for i in range(20):
        targets = make_targets(counts, torch.Generator().manual_seed(100 + i))
        label, _, _, meta = run_cdn(targets, label_noise_ratio=ratio, box_noise_scale=0.0, label_enc=label_enc)
        decoded = decode_labels(label, label_enc)
        groups = meta["num_dn_group"]
        for b, t in enumerate(targets):
            expected = t["labels"]
            for k in range(2 * groups):
                got = decoded[b, k * 10 : k * 10 + counts[b]]
                changed += int((got != expected).sum())
                total += counts[b]
                new_labels.append(got)
    rate = changed / total
    expected_rate = ratio * 0.5 * (1 - 1 / NUM_CLASSES)
    sigma = (expected_rate * (1 - expected_rate) / total) ** 0.5
    assert abs(rate - expected_rate) < 5 * sigma, (rate, expected_rate, total)
    labels = torch.cat(new_labels)
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES  # never the extra embedding row


def test_zero_ratio_keeps_labels_and_skips_label_draws() -> None:
    targets = make_targets([3, 2], torch.Generator().manual_seed(8))
    label_enc = make_label_enc()
    torch.manual_seed(8)
    label, box, _, _ = run_cdn(targets, label_noise_ratio=0.0, label_enc=label_enc)
    torch.manual_seed(8)
    _, box_direct, _, _ = run_cdn(targets, label_noise_ratio=0.0, label_enc=label_enc)
    torch.testing.assert_close(box, box_direct)
    decoded = decode_labels(label, label_enc)
    for b, t in enumerate(targets):
        assert (decoded[b].view(-1, 3)[:, : len(t["labels"])] == t["labels"]).all()


def test_rng_call_order() -> None:
    """Replays the contract's draws (rand_like, randint_like, randint_like, rand_like) on the copy-major layout."""
    counts, scale, ratio = [2, 3], 0.4, 0.5
    targets = make_targets(counts, torch.Generator().manual_seed(9))
    label_enc = make_label_enc()
    torch.manual_seed(9)
    label, box, _, meta = run_cdn(targets, label_noise_ratio=ratio, box_noise_scale=scale, label_enc=label_enc)

    copies, n, max_gt = 2 * meta["num_dn_group"], sum(counts), max(counts)
    labels = torch.cat([t["labels"] for t in targets]).repeat(copies)
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(copies, 1)
    torch.manual_seed(9)
    flip = torch.rand_like(labels.float()) < ratio * 0.5
    chosen = flip.nonzero().view(-1)
    labels[chosen] = torch.randint_like(chosen, 0, NUM_CLASSES)
    sign = torch.randint_like(boxes, 0, 2) * 2 - 1
    m = torch.rand_like(boxes)
    negative = torch.tensor([k % 2 == 1 for k in range(copies) for _ in range(n)])
    m[negative] += 1
    half = torch.cat([boxes[:, 2:], boxes[:, 2:]], dim=1) / 2
    corners = (box_cxcywh_to_xyxy(boxes) + m * sign * half * scale).clamp(0, 1)
    expected_box = torch.logit(torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1))

    decoded = decode_labels(label, label_enc)
    row = 0
    for k in range(copies):
        for b, count in enumerate(counts):
            for j in range(count):
                assert decoded[b, k * max_gt + j] == labels[row]
                torch.testing.assert_close(box[b, k * max_gt + j], expected_box[row])
                row += 1


@pytest.mark.parametrize(
    ("counts", "dn_number"), [([2, 3], 100), ([1], 100), ([4, 0], 10), ([120], 100), ([3, 5, 0], 100), ([2], 1)]
)
def test_attention_mask_rules(counts: list[int], dn_number: int) -> None:
    targets = make_targets(counts, torch.Generator().manual_seed(10))
    _, _, mask, meta = run_cdn(targets, dn_number=dn_number)
    expected = brute_force_mask(meta["pad_size"], meta["num_dn_group"], NUM_QUERIES)
    assert torch.equal(mask, expected)
    assert torch.equal(mask, loop_mask(meta["pad_size"], meta["num_dn_group"], NUM_QUERIES))


def test_attention_mask_small_by_hand() -> None:
    # 2 groups of 2 slots (max_gt 1), then 2 matching queries.
    x, o = True, False
    expected = torch.tensor(
        [
            [o, o, x, x, o, o],
            [o, o, x, x, o, o],
            [x, x, o, o, o, o],
            [x, x, o, o, o, o],
            [x, x, x, x, o, o],
            [x, x, x, x, o, o],
        ]
    )
    assert torch.equal(dn_attention_mask(4, 2, 2), expected)


def test_disabled_returns_none() -> None:
    targets = make_targets([2, 3], torch.Generator().manual_seed(11))
    assert run_cdn(targets, training=False) == (None, None, None, None)
    assert run_cdn(None) == (None, None, None, None)
    assert run_cdn(targets, dn_number=0) == (None, None, None, None)
    assert run_cdn(targets, dn_number=-5) == (None, None, None, None)


def test_no_targets_in_batch_returns_none_and_draws_nothing() -> None:
    targets = make_targets([0, 0], torch.Generator().manual_seed(12))
    label_enc = make_label_enc()
    state = torch.get_rng_state()
    assert run_cdn(targets, label_enc=label_enc) == (None, None, None, None)
    assert torch.equal(torch.get_rng_state(), state)


def test_determinism_under_seed() -> None:
    targets = make_targets([2, 0, 4], torch.Generator().manual_seed(13))
    label_enc = make_label_enc()
    outs = []
    for seed in (21, 21, 22):
        torch.manual_seed(seed)
        outs.append(run_cdn(targets, label_enc=label_enc))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert torch.equal(a, b)
    assert outs[0][3] == outs[1][3]
    assert not torch.equal(outs[0][1], outs[2][1])


def test_content_backpropagates_to_label_enc() -> None:
    targets = make_targets([2, 3], torch.Generator().manual_seed(14))
    label_enc = make_label_enc()
    label, _, _, _ = run_cdn(targets, label_noise_ratio=0.0, label_enc=label_enc)
    label.sum().backward()
    used = torch.cat([t["labels"] for t in targets]).unique()
    grad_rows = label_enc.weight.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows.nonzero().view(-1), used)


def set_aux_loss(outputs_class: Tensor, outputs_coord: Tensor) -> list[dict[str, Tensor]]:
    return [{"pred_logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]


@pytest.mark.parametrize("aux_loss", [True, False])
def test_dn_post_process_split(aux_loss: bool) -> None:
    layers, batch, pad, classes = 3, 2, 6, NUM_CLASSES
    logits = torch.randn(layers, batch, pad + NUM_QUERIES, classes)
    coords = torch.rand(layers, batch, pad + NUM_QUERIES, 4)
    meta = {"pad_size": pad, "num_dn_group": 1}
    out_class, out_coord = dn_post_process(logits, coords, meta, aux_loss, set_aux_loss)
    assert torch.equal(out_class, logits[:, :, pad:]) and torch.equal(out_coord, coords[:, :, pad:])
    known = meta["output_known_lbs_bboxes"]
    assert torch.equal(known["pred_logits"], logits[-1, :, :pad])
    assert torch.equal(known["pred_boxes"], coords[-1, :, :pad])
    if aux_loss:
        assert len(known["aux_outputs"]) == layers - 1
        for i, aux in enumerate(known["aux_outputs"]):
            assert torch.equal(aux["pred_logits"], logits[i, :, :pad])
            assert torch.equal(aux["pred_boxes"], coords[i, :, :pad])
    else:
        assert "aux_outputs" not in known


def test_dn_post_process_without_dn_is_identity() -> None:
    logits, coords = torch.randn(2, 1, NUM_QUERIES, 3), torch.rand(2, 1, NUM_QUERIES, 4)
    out_class, out_coord = dn_post_process(logits, coords, None, True, set_aux_loss)
    assert out_class is logits and out_coord is coords
