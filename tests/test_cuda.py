"""CUDA readiness: a tiny detector on the GPU gives the CPU's numbers (skipped without CUDA).

Covered per model family (parametrised by its flags; a family that fails to build fails, only a missing GPU skips):
forward and a full train step (loss, backward, clipping, fused AdamW) in float32, bf16 autocast and fp16 autocast
with GradScaler; SDPA attention with padding masks against the reference math kernel; channels_last; evaluation
(PostProcess + COCO metrics through ``engine.evaluate``). The CPU float32 run is the reference. TF32 is switched
off so that float32 means float32.

Tolerances (max absolute difference unless stated; tiny model, random weights, outputs of order 1):

| precision | outputs (logits, boxes) | loss (relative) | gradient (cosine to CPU's) |
| --- | --- | --- | --- |
| float32 | 1e-4 | 1e-4 | > 0.999 |
| bf16 | 5e-2 | 2e-2 | > 0.9 |
| fp16 | 1e-2 | 5e-3 | > 0.95 |

After the AdamW step the weights differ from the CPU's by at most 2.5 lr (AdamW's first step moves each weight
by about lr along its gradient's sign). SDPA vs math on the same GPU: 1e-5 (float32). channels_last vs CPU: 1e-4.
COCO stats vs CPU: 1e-2 (near-tied scores of a random model may swap ranks). ``DETR_TEST_DEVICE=cpu`` runs the
same comparisons on the CPU (a dry run of this file where there is no GPU; fp16 is skipped there).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args
from pycocotools.coco import COCO

import models
from engine import evaluate
from main import build_optimizer
from models.attention import set_attention_kernel
from util.acceleration import apply_channels_last
from util.amp import autocast_context, make_grad_scaler, optimizer_step
from util.misc import nested_tensor_from_tensor_list

DEVICE = os.environ.get("DETR_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]

# Model flags per family; add a family here and every test below runs for it.
FAMILIES = {
    "detr": (),
    "deformable_detr": ("--model", "deformable_detr"),
    # No denoising queries: their random noise is drawn from each device's own generator, so a CPU and a CUDA
    # train step would differ by construction.
    "dino": ("--model", "dino", "--dn_number", "0", "--num_select", "20"),
    # The tiny run flags of tests/helpers.py, likewise without denoising queries.
    "rtdetrv2": (*FAMILY_FLAGS["rtdetrv2"], "--dn_number", "0"),
}
# Families whose queries are the top-k encoder proposals: reduced precision may select other ones.
TOP_K_QUERIES = {"dino", "rtdetrv2"}
# ... and where that changes the training loss beyond the tolerance: the tiny RT-DETRv2's bf16 scores select 9 of
# its 10 float32 queries (measured on the CPU), its bf16 loss is then 3% off.
TOP_K_CHANGES_LOSS = {"rtdetrv2"}
TOLERANCES = {  # amp: (outputs, relative loss, minimum cosine of the gradients)
    "off": (1e-4, 1e-4, 0.999),
    "bf16": (5e-2, 2e-2, 0.9),
    "fp16": (1e-2, 5e-3, 0.95),
}
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _strict_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _build(family: str, *extra: str):
    """(args, CPU model, criterion, postprocessors), seeded; a family that fails to build fails the test."""
    args = parse_tiny_args("--num_classes", str(NUM_CLASSES), "--lr_backbone", "1e-5", *FAMILIES[family], *extra)
    torch.manual_seed(0)
    model, criterion, postprocessors = models.build_model(args)
    return args, model, criterion, postprocessors


def _batch(seed: int = 0):
    """Two images of different sizes (the second padded), 1-2 boxes each: (NestedTensor, [target, ...])."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i, (h, w) in enumerate([(64, 96), (48, 64)]):
        images.append(torch.randn(3, h, w, generator=g))
        n = 1 + i
        centers = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({
            "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g), "boxes": torch.cat([centers, sizes], 1),
            "image_id": torch.tensor(i + 1), "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w]),
        })  # fmt: skip
    return nested_tensor_from_tensor_list(images), targets


def _skip_unsupported(amp: str) -> None:
    if amp == "fp16" and torch.device(DEVICE).type == "cpu":
        pytest.skip("--amp fp16 is CUDA only (the CPU dry run skips it)")


def _on(device: str, samples, targets):
    return samples.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _forward(model, samples, targets, amp: str, device: str):
    with autocast_context(torch.device(device).type, amp):
        return model(samples, targets) if getattr(model, "needs_targets", False) else model(samples)


def _weighted_loss(criterion, outputs, targets) -> torch.Tensor:
    losses = criterion(outputs, targets)
    return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)


@pytest.mark.parametrize("amp", sorted(TOLERANCES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_matches_cpu(family, amp):
    _skip_unsupported(amp)
    if family in TOP_K_QUERIES and amp != "off":
        pytest.skip("top-k query selection may pick other proposals in reduced precision (float32 checked)")
    _, model, _, _ = _build(family)
    model.eval()
    samples, targets = _batch()
    gpu_model = copy.deepcopy(model).to(DEVICE)
    with torch.no_grad():
        expected = _forward(model, samples, targets, "off", "cpu")
        got = _forward(gpu_model, *_on(DEVICE, samples, targets), amp, DEVICE)
    tolerance = TOLERANCES[amp][0]
    for key in ("pred_logits", "pred_boxes"):
        assert _max_diff(got[key], expected[key]) <= tolerance, key


@pytest.mark.parametrize("amp", sorted(TOLERANCES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_step_matches_cpu(family, amp):
    """Loss, backward, clipping and one fused-AdamW step (fp16 through the GradScaler) against the CPU's step."""
    _skip_unsupported(amp)
    if family in TOP_K_CHANGES_LOSS and amp != "off":
        pytest.skip("top-k query selection picks other proposals in reduced precision (float32 checked)")
    args, model, criterion, _ = _build(family)
    samples, targets = _batch()
    results = []
    for device, precision in (("cpu", "off"), (DEVICE, amp)):
        net = copy.deepcopy(model).to(device).train()
        crit = copy.deepcopy(criterion).to(device)
        optimizer = build_optimizer(net, args)
        assert optimizer.defaults["fused"]  # the one-kernel AdamW on CPU and CUDA
        scaler = make_grad_scaler(precision, torch.device(device).type)
        assert scaler.is_enabled() == (precision == "fp16")
        before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
        s, t = _on(device, samples, targets)
        loss = _weighted_loss(crit, _forward(net, s, t, precision, device), t)
        grad_norm = optimizer_step(loss, optimizer, scaler, args.clip_max_norm)
        assert torch.isfinite(grad_norm), "fp16 overflowed at the initial scale: the step was skipped"
        trained = [p for p in net.parameters() if p.requires_grad]
        # After the step the gradients are still there, unscaled and clipped: what AdamW stepped with.
        # A parameter unused by this step (RT-DETRv2's denoising class embedding without denoising) has no gradient.
        grads = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten().cpu() for p in trained]
        )
        after = torch.cat([p.detach().float().flatten().cpu() for p in trained])
        results.append((float(loss.detach()), grads, torch.cat([b.float().flatten().cpu() for b in before]), after))
    (loss_cpu, grads_cpu, start, after_cpu), (loss_dev, grads_dev, _, after_dev) = results
    _, loss_tolerance, min_cosine = TOLERANCES[amp]
    assert abs(loss_dev - loss_cpu) <= loss_tolerance * abs(loss_cpu)
    assert float(torch.nn.functional.cosine_similarity(grads_dev, grads_cpu, dim=0)) > min_cosine
    # AdamW's first step moves each weight by about lr (the sign of its gradient): both runs moved, by at most lr
    # (plus weight decay) apart, since a near-zero gradient's sign may differ.
    lr = max(group["lr"] for group in optimizer.param_groups)
    assert (after_dev - start).abs().max() > 0.5 * lr and (after_cpu - start).abs().max() > 0.5 * lr
    assert (after_dev - after_cpu).abs().max() <= 2.5 * lr


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sdpa_with_padding_matches_math_kernel(family):
    _, model, _, _ = _build(family)
    samples, targets = _on(DEVICE, *_batch())
    assert bool(samples.mask.any())  # the batch has padding: SDPA gets a key-padding mask
    fused = copy.deepcopy(model).to(DEVICE).eval()
    reference = copy.deepcopy(fused)
    set_attention_kernel(fused, "sdpa")
    set_attention_kernel(reference, "math")
    with torch.no_grad():
        got = _forward(fused, samples, targets, "off", DEVICE)
        expected = _forward(reference, samples, targets, "off", DEVICE)
    for key in ("pred_logits", "pred_boxes"):
        assert _max_diff(got[key], expected[key]) <= 1e-5, key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_channels_last_matches_cpu(family):
    _, model, criterion, _ = _build(family)
    model.eval()
    samples, targets = _batch()
    gpu_model = apply_channels_last(copy.deepcopy(model).to(DEVICE))
    conv = next(m for m in gpu_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = _forward(model, samples, targets, "off", "cpu")
        got = _forward(gpu_model, *_on(DEVICE, samples, targets), "off", DEVICE)
    for key in ("pred_logits", "pred_boxes"):
        assert _max_diff(got[key], expected[key]) <= 1e-4, key


def _coco(targets) -> COCO:
    images, annotations = [], []
    for t in targets:
        h, w = t["orig_size"].tolist()
        images.append({"id": int(t["image_id"]), "height": h, "width": w})
        for label, (cx, cy, bw, bh) in zip(t["labels"].tolist(), t["boxes"].tolist()):
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": int(t["image_id"]), "category_id": label,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(1, 5)]}
    coco.createIndex()
    return coco


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evaluation_matches_cpu(family):
    """engine.evaluate (PostProcess to original sizes, COCO bbox metrics) on the device equals the CPU's."""
    _, model, _, postprocessors = _build(family)
    batches = [_batch(seed) for seed in range(2)]
    for index, (_, targets) in enumerate(batches):  # unique image ids across batches
        for t in targets:
            t["image_id"] = t["image_id"] + 10 * index
    coco = _coco([t for _, targets in batches for t in targets])
    stats = []
    for device in ("cpu", DEVICE):
        net = copy.deepcopy(model).to(device).eval()
        result, _ = evaluate(net, None, postprocessors, batches, coco, torch.device(device), "", progress=False)
        stats.append(torch.tensor(result["coco_eval_bbox"]))
    assert len(stats[0]) == 12
    assert _max_diff(stats[1], stats[0]) <= 1e-2
