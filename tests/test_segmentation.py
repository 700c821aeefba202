"""Segmentation model: published key names and shapes, forward shapes, attention and mask-head math, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.detr.segmentation import DETRsegm, MaskHeadSmallConv, MHAttentionMap, dice_loss, sigmoid_focal_loss

# Published R50 panoptic checkpoint (hidden 256, 8 heads): every non-detector tensor and its shape.
R50_MASK_KEYS = {
    "bbox_attention.q_linear.weight": (256, 256),
    "bbox_attention.q_linear.bias": (256,),
    "bbox_attention.k_linear.weight": (256, 256),
    "bbox_attention.k_linear.bias": (256,),
    "mask_head.lay1.weight": (264, 264, 3, 3),
    "mask_head.lay1.bias": (264,),
    "mask_head.gn1.weight": (264,),
    "mask_head.gn1.bias": (264,),
    "mask_head.lay2.weight": (128, 264, 3, 3),
    "mask_head.lay2.bias": (128,),
    "mask_head.gn2.weight": (128,),
    "mask_head.gn2.bias": (128,),
    "mask_head.lay3.weight": (64, 128, 3, 3),
    "mask_head.lay3.bias": (64,),
    "mask_head.gn3.weight": (64,),
    "mask_head.gn3.bias": (64,),
    "mask_head.lay4.weight": (32, 64, 3, 3),
    "mask_head.lay4.bias": (32,),
    "mask_head.gn4.weight": (32,),
    "mask_head.gn4.bias": (32,),
    "mask_head.lay5.weight": (16, 32, 3, 3),
    "mask_head.lay5.bias": (16,),
    "mask_head.gn5.weight": (16,),
    "mask_head.gn5.bias": (16,),
    "mask_head.out_lay.weight": (1, 16, 3, 3),
    "mask_head.out_lay.bias": (1,),
    "mask_head.adapter1.weight": (128, 1024, 1, 1),
    "mask_head.adapter1.bias": (128,),
    "mask_head.adapter2.weight": (64, 512, 1, 1),
    "mask_head.adapter2.bias": (64,),
    "mask_head.adapter3.weight": (32, 256, 1, 1),
    "mask_head.adapter3.bias": (32,),
}


def test_r50_mask_keys_match_published():
    from helpers import parse_tiny_args

    args = parse_tiny_args(
        "--masks", "--backbone", "resnet50", "--hidden_dim", "256", "--nheads", "8", "--dec_layers", "1"
    )
    model = models.build_model(args)[0]
    state = model.state_dict()
    mask_keys = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("detr.")}
    assert mask_keys == R50_MASK_KEYS
    groups = {name: m.num_groups for name, m in model.mask_head.named_children() if name.startswith("gn")}
    assert groups == {f"gn{i}": 8 for i in range(1, 6)}
    assert state["detr.input_proj.weight"].shape == (256, 2048, 1, 1)
    assert "detr.backbone.0.body.layer1.0.conv1.weight" in state


def test_tiny_keys_are_detector_plus_mask_head(tiny_args):
    args = tiny_args("--masks")
    model = models.build_model(args)[0]
    plain = models.build_model(tiny_args())[0]
    keys = set(model.state_dict())
    assert {k[len("detr.") :] for k in keys if k.startswith("detr.")} == set(plain.state_dict())
    expected_head = {k.replace("mask_head.", "").rsplit(".", 1)[0] for k in R50_MASK_KEYS if "mask_head" in k}
    got_head = {k[len("mask_head.") :].rsplit(".", 1)[0] for k in keys if k.startswith("mask_head.")}
    assert got_head == expected_head
    assert {k for k in keys if k.startswith("bbox_attention.")} == {k for k in R50_MASK_KEYS if "bbox_attention" in k}
    assert all(k.startswith(("detr.", "mask_head.", "bbox_attention.")) for k in keys)


def test_forward_shapes_and_detector_outputs_unchanged(tiny_args):
    model = models.build_model(tiny_args("--masks"))[0].eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    with torch.no_grad():
        out = model(images)
        detector = model.detr(images)
    assert out["pred_logits"].shape == (2, 10, 92)
    assert out["pred_boxes"].shape == (2, 10, 4)
    # masks live on the padded stride-4 grid: padded 80 x 96 -> 20 x 24
    assert out["pred_masks"].shape == (2, 10, 20, 24)
    assert len(out["aux_outputs"]) == 1 and set(out["aux_outputs"][0]) == {"pred_logits", "pred_boxes"}
    torch.testing.assert_close(out["pred_logits"], detector["pred_logits"])
    torch.testing.assert_close(out["pred_boxes"], detector["pred_boxes"])


def test_attention_map_matches_explicit_formula():
    torch.manual_seed(1)
    attn = MHAttentionMap(query_dim=8, hidden_dim=8, num_heads=2)
    torch.nn.init.normal_(attn.q_linear.bias)
    torch.nn.init.normal_(attn.k_linear.bias)
    q = torch.randn(2, 3, 8)
    k = torch.randn(2, 8, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    out = attn(q, k, mask)
    assert out.shape == (2, 3, 2, 4, 5)
    qp = q @ attn.q_linear.weight.T + attn.q_linear.bias
    for b in range(2):
        for qi in range(3):
            scores = torch.empty(2, 4, 5)
            for n in range(2):
                for y in range(4):
                    for x in range(5):
                        kp = attn.k_linear.weight @ k[b, :, y, x] + attn.k_linear.bias
                        dot = (qp[b, qi, 4 * n : 4 * n + 4] * kp[4 * n : 4 * n + 4]).sum()
                        scores[n, y, x] = -math.inf if mask[b, y, x] else dot / math.sqrt(4)
            want = scores.flatten().softmax(0).view(2, 4, 5)  # one softmax over heads and pixels (published)
            torch.testing.assert_close(out[b, qi], want)
    assert (out[1][:, :, 3:, :] == 0).all()
    torch.testing.assert_close(out.sum(dim=(2, 3, 4)), torch.ones(2, 3))


def test_mask_head_equals_concatenated_reference():
    torch.manual_seed(2)
    head = MaskHeadSmallConv(dim=34, fpn_dims=[24, 12, 6], context_dim=32)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 3, 4)
    bbox_mask = torch.rand(2, 5, 2, 3, 4)
    fpns = [torch.randn(2, 24, 6, 8), torch.randn(2, 12, 12, 16), torch.randn(2, 6, 24, 32)]
    out = head(x, bbox_mask, fpns)
    assert out.shape == (10, 1, 24, 32)

    def repeat(t):  # per-query copies, query-major within each image
        return t.repeat_interleave(5, dim=0)

    y = torch.cat([repeat(x), bbox_mask.flatten(0, 1)], 1)
    y = F.relu(head.gn1(head.lay1(y)))
    y = F.relu(head.gn2(head.lay2(y)))
    for adapter, lay, gn, fpn in zip(
        (head.adapter1, head.adapter2, head.adapter3),
        (head.lay3, head.lay4, head.lay5),
        (head.gn3, head.gn4, head.gn5),
        fpns,
    ):
        f = repeat(adapter(fpn))
        y = F.relu(gn(lay(f + F.interpolate(y, size=f.shape[-2:], mode="nearest"))))
    torch.testing.assert_close(out, head.out_lay(y), rtol=1e-4, atol=1e-5)


def test_frozen_detector_trains_only_the_mask_head(tiny_args):
    detr = models.build_model(tiny_args("--masks"))[0].detr  # a detector with all four backbone stages
    model = DETRsegm(detr, freeze_detr=True)
    assert not any(p.requires_grad for p in model.detr.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("detr."))
    out = model([torch.randn(3, 64, 64)])
    out["pred_masks"].sum().backward()
    assert model.mask_head.lay1.weight.grad is not None and model.bbox_attention.q_linear.weight.grad is not None


def test_build_with_frozen_weights_freezes_detr(tiny_args):
    model = models.build_model(tiny_args("--masks", "--frozen_weights", "unused.pth"))[0]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bbox_attention", "mask_head"}


def test_dice_loss_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 100.0, -100.0, -100.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # row 0: p = 0.5 everywhere: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4; row 1: perfect -> 1 - 5/5 = 0
    assert dice_loss(logits, targets, num_boxes=1).item() == pytest.approx(0.4)
    assert dice_loss(logits, targets, num_boxes=4).item() == pytest.approx(0.1)


def test_sigmoid_focal_loss_matches_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    total = 0.0
    for row_logits, row_targets in zip(logits.tolist(), targets.tolist()):
        row = 0.0
        for x, t in zip(row_logits, row_targets):
            p = 1 / (1 + math.exp(-x))
            p_t = p if t else 1 - p
            alpha_t = 0.25 if t else 0.75
            row += -alpha_t * (1 - p_t) ** 2 * math.log(p_t)
        total += row / 3
    assert sigmoid_focal_loss(logits, targets, num_boxes=2).item() == pytest.approx(total / 2, rel=1e-5)
    # gamma 0 and no alpha weighting is the plain binary cross-entropy
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum()
    assert sigmoid_focal_loss(logits, targets, 1, alpha=-1, gamma=0).item() == pytest.approx(bce.item(), rel=1e-6)


def test_criterion_mask_losses_backpropagate(tiny_args):
    model, criterion, _ = models.build_model(tiny_args("--masks"))
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 64)]
    targets = []
    for h, w in ((64, 64), (48, 64)):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, :20, :20] = 1
        masks[1, 20:, 30:] = 1
        boxes = torch.tensor(
            [[10 / w, 10 / h, 20 / w, 20 / h], [(30 + w) / 2 / w, (20 + h) / 2 / h, (w - 30) / w, 1 - 20 / h]]
        )
        targets.append({"labels": torch.tensor([1, 3]), "boxes": boxes, "masks": masks})
    losses = criterion(model(images), targets)
    assert {"loss_mask", "loss_dice"} <= set(losses) and "loss_mask_0" not in losses
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- post-processing

NO_OBJECT = 110  # logits have 111 entries: categories 0..109 and "no object"
IS_THING = {1: True, 2: True, 100: False, 101: False}


def class_logits(*labels_probs):
    """[1, Q, 111] logits whose softmax puts ``prob`` on ``label`` and the rest on "no object"."""
    rows = []
    for label, prob in labels_probs:
        row = torch.full((NO_OBJECT + 1,), -1e4)
        row[label] = math.log(prob)
        if label != NO_OBJECT and prob < 1:
            row[NO_OBJECT] = math.log(1 - prob)
        rows.append(row)
    return torch.stack(rows)[None]


def decode(prediction):
    from datasets.panoptic_eval import read_panoptic_png

    return torch.from_numpy(read_panoptic_png(prediction["png_string"]))


def test_panoptic_merges_stuff_and_respects_threshold():
    from models.detr.segmentation import PostProcessPanoptic

    masks = torch.full((1, 5, 8, 8), -5.0)
    masks[0, 0, :4] = 5  # thing 1: top half
    masks[0, 1, 4:, :4] = 5  # stuff 100: bottom left
    masks[0, 2, 4:, 4:] = 5  # stuff 100 again: bottom right
    masks[0, 3] = 50  # class 2 at probability 0.8: below the default threshold
    masks[0, 4] = 60  # "no object"
    outputs = {"pred_logits": class_logits((1, 1.0), (100, 0.99), (100, 0.95), (2, 0.8), (NO_OBJECT, 1.0))}
    outputs["pred_masks"] = masks
    (result,) = PostProcessPanoptic(IS_THING)(outputs, torch.tensor([[8, 8]]))
    assert result["segments_info"] == [
        {"id": 1, "isthing": True, "category_id": 1, "area": 32},
        {"id": 2, "isthing": False, "category_id": 100, "area": 32},
    ]
    ids = decode(result)
    assert (ids[:4] == 1).all() and (ids[4:] == 2).all()
    (result,) = PostProcessPanoptic(IS_THING, threshold=0.75)(outputs, torch.tensor([[8, 8]]))
    assert result["segments_info"] == [{"id": 1, "isthing": True, "category_id": 2, "area": 64}]


def test_panoptic_things_of_one_class_stay_separate():
    from models.detr.segmentation import PostProcessPanoptic

    masks = torch.full((1, 2, 8, 8), -5.0)
    masks[0, 0, :, :4] = 5
    masks[0, 1, :, 4:] = 5
    outputs = {"pred_logits": class_logits((1, 0.9), (1, 0.9)), "pred_masks": masks}
    (result,) = PostProcessPanoptic(IS_THING)(outputs, torch.tensor([[8, 8]]))
    assert [(s["id"], s["category_id"], s["area"]) for s in result["segments_info"]] == [(1, 1, 32), (2, 1, 32)]


@pytest.mark.parametrize("small_width, kept", [(2, False), (3, True)])
def test_panoptic_drops_tiny_segments(small_width, kept):
    from models.detr.segmentation import PostProcessPanoptic

    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 1, :2, :small_width] = 10  # a 2 x small_width segment of class 2 over class 1
    outputs = {"pred_logits": class_logits((1, 0.99), (2, 0.99)), "pred_masks": masks}
    (result,) = PostProcessPanoptic(IS_THING)(outputs, torch.tensor([[8, 8]]))
    small = 2 * small_width
    if kept:
        assert [(s["category_id"], s["area"]) for s in result["segments_info"]] == [(1, 64 - small), (2, small)]
    else:  # 4 pixels or fewer: dropped, its pixels go to the remaining query
        assert [(s["category_id"], s["area"]) for s in result["segments_info"]] == [(1, 64)]
        assert (decode(result) == 1).all()
    # The area rule applies at the output size: upsampled x2, the 4-pixel segment has 16 pixels and stays.
    (result,) = PostProcessPanoptic(IS_THING)(outputs, torch.tensor([[8, 8]]), torch.tensor([[16, 16]]))
    assert [(s["category_id"], s["area"]) for s in result["segments_info"]] == [(1, 256 - 4 * small), (2, 4 * small)]
    assert decode(result).shape == (16, 16)


def test_panoptic_crops_padding_and_handles_empty_images():
    from models.detr.segmentation import PostProcessPanoptic

    masks = torch.full((2, 2, 8, 8), -5.0)
    masks[:, 0, :2] = 5
    masks[:, 1, 2:] = 5
    masks[1, 0, 4:] = 9  # padding of the second (4 x 8) image: must not leak into its segments
    logits = torch.cat([class_logits((1, 0.99), (2, 0.99)), class_logits((NO_OBJECT, 1.0), (1, 0.5))])
    outputs = {"pred_logits": logits[[0, 0]], "pred_masks": masks}
    sizes = torch.tensor([[8, 8], [4, 8]])
    first, second = PostProcessPanoptic(IS_THING)(outputs, sizes)
    assert [(s["category_id"], s["area"]) for s in first["segments_info"]] == [(1, 16), (2, 48)]
    ids = decode(second)
    assert ids.shape == (4, 8) and (ids[:2] == 1).all() and (ids[2:] == 2).all()
    assert [s["area"] for s in second["segments_info"]] == [16, 16]
    outputs["pred_logits"] = logits[[1, 1]]  # nothing confident: the whole image is void
    empty, _ = PostProcessPanoptic(IS_THING)(outputs, sizes)
    assert empty["segments_info"] == [] and (decode(empty) == 0).all()


def test_segm_masks_cropped_and_resized_to_original_size():
    from models.detr.segmentation import PostProcessSegm

    logits = torch.full((2, 3, 4, 4), -10.0)
    logits[:, 0, :, :2] = 10  # left half
    logits[:, 1, :2, :] = 10  # top half
    results = [{"scores": torch.ones(3)}, {"scores": torch.ones(3)}]
    out = PostProcessSegm()(
        results, {"pred_masks": logits}, torch.tensor([[16, 16], [8, 16]]), torch.tensor([[8, 8], [4, 8]])
    )
    assert out is results
    first, second = out[0]["masks"], out[1]["masks"]
    assert first.dtype == torch.uint8 and first.shape == (3, 1, 16, 16) and second.shape == (3, 1, 8, 16)
    assert (first[0, 0, :, :8] == 1).all() and (first[0, 0, :, 8:] == 0).all()
    assert (first[1, 0, :8] == 1).all() and (first[1, 0, 8:] == 0).all() and first[2].sum() == 0
    # the second image is the top half of the padded grid: query 1 covers all of it
    assert (second[1] == 1).all() and (second[0, 0, :, :8] == 1).all() and (second[0, 0, :, 8:] == 0).all()


def test_segm_output_scores_perfect_mask_ap_with_coco_evaluator():
    """PostProcess + PostProcessSegm outputs go straight into CocoEvaluator('segm'): exact masks give AP 1."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from datasets.coco_eval import CocoEvaluator
    from models.detr import PostProcess
    from models.detr.segmentation import PostProcessSegm

    # original image 32 x 48 (h x w), fed to the model at 16 x 24; masks on the 4 x 6 stride-4 grid
    gt_masks = torch.zeros(2, 32, 48, dtype=torch.uint8)
    gt_masks[0, :16, :24] = 1
    gt_masks[1, 16:, 24:] = 1
    annotations = []
    for k, m in enumerate(gt_masks):
        rle = mask_utils.encode(m.numpy()[:, :, None].copy(order="F"))[0]
        rle["counts"] = rle["counts"].decode()
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append(
            {"id": k + 1, "image_id": 7, "category_id": 1 + 2 * k, "segmentation": rle, "area": float(m.sum())}
            | {"bbox": [x, y, w, h], "iscrowd": 0}
        )
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "height": 32, "width": 48}],
        "annotations": annotations,
        "categories": [{"id": 1}, {"id": 3}],
    }
    coco.createIndex()

    logits = torch.full((1, 3, 5), -10.0)
    logits[0, 0, 1] = logits[0, 1, 3] = 10.0
    logits[0, 2, 4] = 10.0  # "no object"
    masks = torch.full((1, 3, 4, 6), -10.0)
    masks[0, 0, :2, :3] = 10
    masks[0, 1, 2:, 3:] = 10
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}
    orig, size = torch.tensor([[32, 48]]), torch.tensor([[16, 24]])
    results = PostProcessSegm()(PostProcess()(outputs, orig), outputs, orig, size)
    got = results[0]["masks"][:2, 0]
    assert got.shape == gt_masks.shape and got.dtype == torch.uint8
    iou = (got & gt_masks).flatten(1).sum(1) / (got | gt_masks).flatten(1).sum(1)
    assert (iou > 0.98).all()  # only the corner pixels round differently under bilinear upsampling
    evaluator = CocoEvaluator(coco, ["segm"])
    evaluator.update({7: results[0]})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize(verbose=False)
    assert evaluator.stats("segm")[0] == pytest.approx(1.0)
