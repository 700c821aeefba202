"""util/acceleration.py: channels_last equals the default layout; compile keeps names and numbers.

Compiling with the inductor backend takes minutes on a small CPU, so that test runs only with
DETR_TEST_COMPILE=1; the default compile test traces with dynamo's 'eager' backend (seconds).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import models
from util.acceleration import apply_channels_last, compile_model
from util.misc import nested_tensor_from_tensor_list


def _model_and_batch(tiny_args, *flags):
    model, criterion, _ = models.build_model(tiny_args("--num_classes", "5", *flags))
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 96, generator=generator), torch.randn(3, 80, 64, generator=generator)]
    return model.eval(), criterion, nested_tensor_from_tensor_list(images)


def _assert_outputs_close(a: dict, b: dict, tol: float) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)
    for aux_a, aux_b in zip(a["aux_outputs"], b["aux_outputs"], strict=True):
        torch.testing.assert_close(aux_a["pred_boxes"], aux_b["pred_boxes"], rtol=tol, atol=tol)


def test_channels_last_output_equals_default(tiny_args):
    model, _, samples = _model_and_batch(tiny_args)
    with torch.no_grad():
        expected = model(samples)
    keys = list(model.state_dict())
    assert apply_channels_last(model) is model
    assert list(model.state_dict()) == keys
    conv = model.backbone[0].body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with torch.no_grad():
        actual = model(samples)
        features, _ = model.backbone(samples)
    assert features[-1].tensors.is_contiguous(memory_format=torch.channels_last)  # NHWC really propagated
    _assert_outputs_close(actual, expected, 1e-5)


def test_channels_last_gradients_equal_default(tiny_args):
    model, criterion, samples = _model_and_batch(tiny_args)
    model.train()
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])}]
    targets.append({"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])})

    def grads(m):
        m.zero_grad()
        losses = criterion(m(samples), targets)
        sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    expected = grads(model)
    actual = grads(apply_channels_last(model))
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name].contiguous(), expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_model_in_place_keeps_names_and_numbers(tiny_args):
    model, _, samples = _model_and_batch(tiny_args)
    with torch.no_grad():
        expected = model(samples)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    report = compile_model(model, backend="eager")
    assert report.modules == ["backbone", "transformer"] and report.first_forward_s is None
    assert list(model.state_dict()) == keys  # no '_orig_mod.' prefixes: published checkpoints still load
    model.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        actual = model(samples)
        again = model(samples)
    assert report.first_forward_s is not None and report.first_forward_s > 0
    _assert_outputs_close(actual, expected, 1e-5)
    _assert_outputs_close(again, expected, 1e-5)
    torch._dynamo.reset()


def test_compile_model_needs_backbone_or_transformer():
    with pytest.raises(ValueError, match="--compile"):
        compile_model(nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DETR_TEST_COMPILE"), reason="inductor compile takes minutes on CPU")
def test_inductor_compiled_training_step_equals_eager(tiny_args):
    model, criterion, samples = _model_and_batch(tiny_args)
    model.train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
    eager = criterion(model(samples), targets)
    torch._dynamo.reset()
    compile_model(model)
    compiled = criterion(model(samples), targets)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-4, msg=name)
    torch._dynamo.reset()
