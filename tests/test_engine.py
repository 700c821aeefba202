"""engine.train_one_epoch / evaluate on a tiny model: logged numbers, clipping, iteration caps, non-finite stops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pycocotools.coco import COCO

import models
from engine import NonFiniteLossError, evaluate, lead_lr_group, train_one_epoch
from util.misc import nested_tensor_from_tensor_list


def _batches(n_batches: int, batch_size: int = 2, seed: int = 0) -> list:
    """Random 64 px images with 1-2 boxes each: [(NestedTensor, (target, ...)), ...]."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        images, targets = [], []
        for i in range(batch_size):
            images.append(torch.randn(3, 64, 48 + 8 * i, generator=g))
            n = 1 + i % 2
            centers = torch.rand(n, 2, generator=g) * 0.5 + 0.25
            sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
            targets.append(
                {
                    "labels": torch.randint(1, 5, (n,), generator=g),
                    "boxes": torch.cat([centers, sizes], dim=1),
                    "image_id": torch.tensor(b * batch_size + i + 1),
                    "orig_size": torch.tensor([64, 48 + 8 * i]),
                    "size": torch.tensor([64, 48 + 8 * i]),
                }
            )
        batches.append((nested_tensor_from_tensor_list(images), tuple(targets)))
    return batches


@pytest.fixture
def tiny(tiny_args):
    args = tiny_args("--num_classes", "5", "--lr_backbone", "0")
    model, criterion, postprocessors = models.build_model(args)
    return model, criterion, postprocessors


class _RecordingLogger:
    def __init__(self):
        self.calls = []

    def scalars(self, values, step, prefix=""):
        self.calls.append((dict(values), step, prefix))


def _weighted_loss(model, criterion, batch) -> float:
    samples, targets = batch
    loss_dict = criterion(model(samples), list(targets))
    return sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict).item()


def test_one_iteration_logs_the_loss_and_grad_norm_it_used(tiny):
    model, criterion, _ = tiny
    batch = _batches(1)[0]
    # Independent computation on a copy: the loss before the step and the unclipped gradient norm.
    ref_model, ref_criterion = copy.deepcopy(model), copy.deepcopy(criterion)
    ref_model.train()
    samples, targets = batch
    loss_dict = ref_criterion(ref_model(samples), list(targets))
    expected_loss = sum(loss_dict[k] * w for k, w in ref_criterion.weight_dict.items() if k in loss_dict)
    expected_loss.backward()
    grads = [p.grad for p in ref_model.parameters() if p.grad is not None]
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    logger = _RecordingLogger()
    stats = train_one_epoch(model, criterion, [batch], optimizer, torch.device("cpu"), epoch=3, max_norm=0.01,
                            logger=logger, progress=False)  # fmt: skip
    assert stats["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    assert stats["loss_ce_unscaled"] == pytest.approx(loss_dict["loss_ce"].item(), rel=1e-5)
    assert stats["loss_bbox"] == pytest.approx(loss_dict["loss_bbox"].item() * criterion.weight_dict["loss_bbox"])
    assert {"class_error", "lr", "iter_time", "data_time"} <= set(stats)
    # Clipped: an SGD step of lr 1 moves the parameters by exactly the clipped gradient (norm 0.01).
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    step = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(after, before)]))
    assert step.item() == pytest.approx(0.01, rel=1e-3)
    ((values, step_index, prefix), (group_lrs, group_step, group_prefix)) = logger.calls
    assert prefix == "train/" and step_index == 3  # epoch 3 x 1 iteration + 0
    assert {"loss", "loss_ce", "lr", "grad_norm", "iter_time", "data_time"} <= set(values)
    assert (group_lrs, group_step, group_prefix) == ({"group0": 1.0}, 3, "lr/")


def test_max_iters_caps_the_epoch_and_the_loss_falls(tiny):
    model, criterion, _ = tiny
    batches = _batches(3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen = []

    class Counting(list):
        def __iter__(self):
            for item in super().__iter__():
                seen.append(item)
                yield item

    first = _weighted_loss(model, criterion, batches[0])
    for epoch in range(8):
        train_one_epoch(model, criterion, Counting(batches), optimizer, torch.device("cpu"), epoch,
                        max_iters=2, progress=False)  # fmt: skip
    assert len(seen) == 16  # 8 epochs x 2 of the 3 batches
    assert _weighted_loss(model, criterion, batches[0]) < 0.8 * first


class _NaNAt:
    """Criterion wrapper whose 'loss_giou' becomes NaN on the given calls."""

    def __init__(self, criterion, bad_calls):
        self.criterion, self.bad_calls, self.calls = criterion, set(bad_calls), 0
        self.weight_dict = criterion.weight_dict

    def train(self, mode=True):
        return self.criterion.train(mode)

    def eval(self):
        return self.criterion.eval()

    def __call__(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if self.calls in self.bad_calls:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        self.calls += 1
        return losses


def test_non_finite_loss_stops_naming_the_term_without_stepping(tiny):
    model, criterion, _ = tiny
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = _batches(3)
    train_one_epoch(model, criterion, batches[:1], optimizer, torch.device("cpu"), 0, progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"loss_giou=nan") as info:
        train_one_epoch(model, _NaNAt(criterion, {0}), batches, optimizer, torch.device("cpu"), 1, progress=False)
    assert "epoch 1, iteration 0" in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_skip_nonfinite_skips_up_to_n_batches(tiny):
    model, criterion, _ = tiny
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stats = train_one_epoch(model, _NaNAt(criterion, {1}), _batches(3), optimizer, torch.device("cpu"), 0,
                            progress=False, skip_nonfinite=1)  # fmt: skip
    assert math.isfinite(stats["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, _NaNAt(criterion, {0, 1}), _batches(3), optimizer, torch.device("cpu"), 1,
                        progress=False, skip_nonfinite=1)  # fmt: skip


class _Oracle(torch.nn.Module):
    """Outputs the ground truth of each batch in turn: perfect detections."""

    def __init__(self, batches, num_classes, num_queries=5):
        super().__init__()
        self.targets = [t for _, targets in batches for t in targets]
        self.num_classes, self.num_queries, self.cursor = num_classes, num_queries, 0

    def forward(self, samples):
        batch = samples.tensors.shape[0]
        logits = torch.full((batch, self.num_queries, self.num_classes + 1), -10.0)
        logits[..., -1] = 10.0  # "no object" everywhere...
        boxes = torch.full((batch, self.num_queries, 4), 0.5)
        for b in range(batch):
            target = self.targets[self.cursor]
            self.cursor += 1
            n = len(target["labels"])
            logits[b, torch.arange(n), -1] = -10.0  # ...except one query per object
            logits[b, torch.arange(n), target["labels"]] = 10.0
            boxes[b, :n] = target["boxes"]
        return {"pred_logits": logits, "pred_boxes": boxes}


def _coco_from_batches(batches) -> COCO:
    images, anns = [], []
    for _, targets in batches:
        for t in targets:
            h, w = t["orig_size"].tolist()
            images.append({"id": int(t["image_id"]), "height": h, "width": w})
            for label, (cx, cy, bw, bh) in zip(t["labels"].tolist(), t["boxes"].tolist()):
                box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
                anns.append({"id": len(anns) + 1, "image_id": int(t["image_id"]), "category_id": label, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": i} for i in range(1, 5)]}
    coco.createIndex()
    return coco


def test_evaluate_scores_perfect_predictions_as_ap_one(tiny, capsys):
    _, _, postprocessors = tiny
    batches = _batches(2)
    # The transformed size differs from the original: boxes must be scaled to the ORIGINAL size.
    for _, targets in batches:
        for t in targets:
            t["size"] = t["size"] * 2
    stats, evaluator = evaluate(_Oracle(batches, num_classes=5), None, postprocessors, batches,
                                _coco_from_batches(batches), torch.device("cpu"), "", progress=False)  # fmt: skip
    assert stats["coco_eval_bbox"][0] == pytest.approx(1.0)
    assert stats["coco_eval_bbox"][8] == pytest.approx(1.0)  # AR@100
    assert len(evaluator.results_json("bbox")) == 4 * 5
    assert "IoU metric: bbox" in capsys.readouterr().out


def _two_lr_groups(model, head_lr: float, rest_lr: float) -> torch.optim.SGD:
    """Group 0: the class head at ``head_lr`` (first, as RT-DETRv2's backbone group is); group 1: the rest."""
    head = {id(p) for p in model.class_embed.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD([{"params": [p for p in trainable if id(p) in head], "lr": head_lr},
                            {"params": [p for p in trainable if id(p) not in head], "lr": rest_lr}])  # fmt: skip


def test_the_logged_lr_is_the_lead_group_and_tensorboard_gets_every_group(tiny):
    model, criterion, _ = tiny
    optimizer = _two_lr_groups(model, 1e-5, 1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)  # records initial_lr 1e-5, 1e-3
    optimizer.step(), scheduler.step()  # the lrs now: 5e-6, 5e-4
    logger = _RecordingLogger()
    stats = train_one_epoch(model, criterion, _batches(2), optimizer, torch.device("cpu"), epoch=0, logger=logger,
                            progress=False)  # fmt: skip
    assert stats["lr"] == pytest.approx(5e-4)  # the largest base lr, not group 0's
    assert [c for c in logger.calls if c[2] == "lr/"] == [({"group0": 5e-6, "group1": 5e-4}, i, "lr/") for i in (0, 1)]
    assert [c[0]["lr"] for c in logger.calls if c[2] == "train/"] == pytest.approx([5e-4, 5e-4])
    stats = train_one_epoch(model, criterion, _batches(1), optimizer, torch.device("cpu"), epoch=1, progress=False,
                            lr_group=0)  # fmt: skip
    assert stats["lr"] == pytest.approx(5e-6)
    with pytest.raises(ValueError, match="lr_group 2 is not one of the optimizer's 2 groups"):
        train_one_epoch(model, criterion, _batches(1), optimizer, torch.device("cpu"), epoch=1, lr_group=2)


def test_lead_lr_group_matches_the_flag_on_the_base_lr():
    def optimizer(*lrs: float, initial: tuple[float, ...] = ()) -> torch.optim.SGD:
        groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs]
        for group, base in zip(groups, initial):
            group["initial_lr"] = base
        return torch.optim.SGD(groups)

    assert lead_lr_group(optimizer(1e-5, 1e-4, 1e-4), 1e-4) == 1  # RT-DETRv2-like: backbone group first
    assert lead_lr_group(optimizer(2e-4, 2e-5, 2e-5), 2e-4) == 0  # Deformable DETR: --lr group first
    assert lead_lr_group(optimizer(1e-4, 3e-4), 1e-4) == 0  # a backbone faster than the rest still follows --lr
    assert lead_lr_group(optimizer(1e-4, 3e-4), 5e-4) == 1  # no match: the largest
    assert lead_lr_group(optimizer(1e-4, 3e-4)) == 1
    # Under a warm-up or after a drop the current lr differs: the scheduler's initial_lr decides.
    assert lead_lr_group(optimizer(1e-7, 1e-6, initial=(1e-5, 1e-4)), 1e-4) == 1


def test_lead_lr_group_of_the_rtdetrv2_recipe_is_a_non_backbone_group():
    from helpers import FAMILY_FLAGS, TINY_FLAGS

    import main as main_module
    from run.recipe import build_optimizer

    args = main_module.parse_args([*TINY_FLAGS, *FAMILY_FLAGS["rtdetrv2"], "--lr", "3e-4", "--lr_backbone", "2e-5"])
    model = models.build_model(args, 5)[0]
    optimizer = build_optimizer(model, args)
    index = lead_lr_group(optimizer, args.lr)
    backbone = {id(p) for p in model.backbone.parameters()}
    assert index > 0 and optimizer.param_groups[0]["lr"] == 2e-5  # group 0 is the backbone's
    assert optimizer.param_groups[index]["lr"] == 3e-4
    assert not any(id(p) in backbone for p in optimizer.param_groups[index]["params"])
