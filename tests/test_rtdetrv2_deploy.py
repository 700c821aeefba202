"""RT-DETRv2 inference speed-ups: RepVGG re-parameterisation, prepared models, the box head on the top-K tokens
only, and the backbone's in-place ReLUs.

Oracles: the two-branch block computed by hand with F.conv2d / F.batch_norm; the unprepared model; the published
query selection (box head on every token, then gathered) written out below; the backbone with out-of-place ReLUs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILY_FLAGS, parse_tiny_args
from torch import nn
from torchvision import ops

from models import build_model
from models.deploy import prepare_for_inference
from models.presnet import ConvNormLayer, PResNet
from models.rtdetrv2.decoder import RTDETRTransformerv2
from models.rtdetrv2.hybrid_encoder import RepVggBlock

TOL = 1e-5
SIZE = 64
NORMS = (nn.BatchNorm2d, ops.FrozenBatchNorm2d)


def images(count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def calibrate_(model: nn.Module, affine_noise: float = 0.2) -> nn.Module:
    """BatchNorm statistics of random images (random statistics blow features up) and a random affine."""
    generator = torch.Generator().manual_seed(3)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
        with torch.no_grad():
            bn.weight.copy_(1 + affine_noise * torch.randn(bn.weight.shape, generator=generator))
            bn.bias.copy_(affine_noise * torch.randn(bn.bias.shape, generator=generator))
    model.train()
    with torch.no_grad():
        model(images(4))
    return model.eval()


def test_repvgg_fusion_equals_the_two_branches_by_hand():
    block = RepVggBlock(6).eval()
    with torch.no_grad():
        for bn in (block.conv1.norm, block.conv2.norm):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.normal_(1, 0.5)
            bn.bias.normal_()
    x = torch.randn(2, 6, 9, 7)

    def branch(layer, padding):
        bn = layer.norm
        y = F.conv2d(x, layer.conv.weight, padding=padding)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    with torch.no_grad():
        expected = F.silu(branch(block.conv1, 1) + branch(block.conv2, 0))
        block.fuse_for_inference()
        got = block(x)
    assert block.fused.kernel_size == (3, 3) and not hasattr(block, "conv1") and not hasattr(block, "conv2")
    assert [k for k, _ in block.named_parameters()] == ["fused.weight", "fused.bias"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def tiny_model(frozen: bool) -> nn.Module:
    """The shared tiny RT-DETRv2 with calibrated BN; ``frozen``: the same weights in a FrozenBatchNorm2d backbone."""
    flags = FAMILY_FLAGS["rtdetrv2"]
    model = calibrate_(build_model(parse_tiny_args(*flags))[0])
    if not frozen:
        return model
    frozen_model = build_model(parse_tiny_args(*flags, "--freeze_norm", "--freeze_at", "0"))[0]
    state = {k: v for k, v in model.state_dict().items() if not (k.startswith("backbone.") and "num_batches" in k)}
    frozen_model.load_state_dict(state, strict=True)
    assert any(type(m) is not nn.BatchNorm2d and isinstance(m, NORMS) for m in frozen_model.modules())
    return frozen_model.eval()


@pytest.mark.parametrize("frozen", [False, True], ids=["bn", "frozen_bn"])
@pytest.mark.parametrize(
    ("dtype", "tol", "channels_last"),
    [(torch.float64, TOL, True), (torch.float64, TOL, False), (torch.float32, 1e-4, True)],
    ids=["float64_channels_last", "float64", "float32_channels_last"],
)
def test_prepared_model_gives_the_same_detections(frozen, dtype, tol, channels_last):
    """float64 isolates the folding (1e-5); in float32 the reordered sums differ by ~1e-5 on logits near -4.6."""
    model = tiny_model(frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype)
    x = images().to(dtype)
    with torch.no_grad():
        expected = model(x)
    prepared = prepare_for_inference(model, channels_last=channels_last)
    with torch.no_grad():
        got = prepared(x)
    for name in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[name], expected[name], atol=tol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # Every norm follows a convolution: RepVGG blocks fold their two each, the rest one per pair; none is left.
    repvgg = sum(isinstance(m, RepVggBlock) for m in model.modules())
    norms = sum(isinstance(m, NORMS) for m in model.modules())
    assert repvgg == 12 and prepared.folded_conv_norms == norms - 2 * repvgg
    assert not any(isinstance(m, NORMS) for m in prepared.modules())
    assert all(m.fused is not None for m in prepared.modules() if isinstance(m, RepVggBlock))
    # The encoder's SiLUs work in place in the copy only (the source keeps them for autograd).
    assert all(m.act.inplace for m in prepared.modules() if isinstance(m, ConvNormLayer) and hasattr(m.act, "inplace"))
    assert any(isinstance(m, nn.SiLU) and not m.inplace for m in model.modules())
    state = model.to(torch.float32).state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], v) for k, v in before.items())


def published_select_queries(self: RTDETRTransformerv2, memory: torch.Tensor, shapes):
    """The published order: encoder heads (score AND box) on every token, then gather the top K."""
    anchors, valid = self._anchors(shapes, memory.device)
    memory = valid.to(memory.dtype) * memory
    out_memory = self.enc_output(memory)
    logits = self.enc_score_head(out_memory)
    coords = self.enc_bbox_head(out_memory) + anchors
    index = logits.max(-1).values.topk(self.num_queries, dim=1).indices
    pick = [torch.stack([t[b, index[b]] for b in range(t.shape[0])]) for t in (coords, logits, out_memory)]
    coords, logits, out_memory = pick
    return out_memory.detach(), coords.detach(), logits, coords.sigmoid()


def _flatten(outputs, prefix: str = ""):
    """(name, tensor) of every tensor in a nested output dict/list, for comparisons."""
    if isinstance(outputs, torch.Tensor):
        yield prefix, outputs
    elif isinstance(outputs, dict):
        for key, value in outputs.items():
            yield from _flatten(value, f"{prefix}.{key}")
    elif isinstance(outputs, (list, tuple)):
        for i, value in enumerate(outputs):
            yield from _flatten(value, f"{prefix}.{i}")


@pytest.mark.parametrize("mode", ["eval", "train_dn", "train_no_dn"])
def test_box_head_on_top_k_tokens_equals_the_published_order(mode, monkeypatch):
    flags = FAMILY_FLAGS["rtdetrv2"] + (("--dn_number", "0") if mode == "train_no_dn" else ())
    model, criterion, _ = build_model(parse_tiny_args(*flags))
    calibrate_(model)
    model.train(mode != "eval")
    with torch.no_grad():  # the zero-initialised last box layers would hide the box head's input
        for head in (model.decoder.enc_bbox_head, *model.decoder.dec_bbox_head):
            head.layers[-1].weight.normal_(0, 0.1)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]])}
               for _ in range(2)]  # fmt: skip
    x = images()

    def run():
        torch.manual_seed(0)  # the same denoising queries in both runs
        model.zero_grad(set_to_none=True)
        outputs = model(x, targets)
        if model.training:
            losses = criterion(outputs, targets)
            sum(losses[k] * criterion.weight_dict[k] for k in losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return dict(_flatten(outputs)), grads

    ours, our_grads = run()
    monkeypatch.setattr(RTDETRTransformerv2, "_select_queries", published_select_queries)
    reference, reference_grads = run()
    assert ("dn_meta" in str(list(ours))) == (mode == "train_dn")
    assert ours.keys() == reference.keys() and len(ours) >= 2
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert our_grads.keys() == reference_grads.keys()
    assert ("decoder.enc_bbox_head.layers.0.weight" in our_grads) == (mode != "eval")
    for name, value in reference_grads.items():
        torch.testing.assert_close(our_grads[name], value, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_in_place_relu_backbone_trains_like_the_out_of_place_one(monkeypatch):
    backbone = PResNet(18, (1, 2, 3), freeze_at=-1, freeze_norm=False).train()
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in backbone.modules())
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    def step():
        backbone.zero_grad(set_to_none=True)
        outs = backbone(x)
        sum((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() for out in outs).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in backbone.named_parameters()}

    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    outs, grads = step()
    backbone.load_state_dict(state)  # the BN running statistics moved
    for module in backbone.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    monkeypatch.setattr(F, "relu_", F.relu)
    reference_outs, reference_grads = step()
    for got, expected in zip(outs, reference_outs):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert grads.keys() == reference_grads.keys() and len(grads) > 0
    for name, value in reference_grads.items():
        torch.testing.assert_close(grads[name], value, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_onnx_export_traces_the_prepared_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tools.export_onnx import compare_with_onnxruntime, export_onnx

    model = tiny_model(frozen=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in prepare_for_inference(model).modules())

    def op_counts(path) -> dict[str, int]:
        ops_ = [node.op_type for node in onnx.load(str(path)).graph.node]
        return {"Conv": ops_.count("Conv"), "BatchNormalization": ops_.count("BatchNormalization")}

    prepared_path = export_onnx(model, tmp_path / "prepared.onnx", SIZE, SIZE)
    plain_path = export_onnx(model, tmp_path / "plain.onnx", SIZE, SIZE, prepare=False)
    assert op_counts(prepared_path) == {"Conv": convs, "BatchNormalization": 0}
    assert op_counts(plain_path)["Conv"] == convs + 12  # RepVGG blocks: two convolutions each
    assert isinstance(model.encoder.fpn_blocks[0].bottlenecks[0].conv1.norm, nn.BatchNorm2d)  # source untouched
    diffs = compare_with_onnxruntime(model, prepared_path, images(1))  # against the unprepared model
    assert max(diffs.values()) < 1e-4, diffs
