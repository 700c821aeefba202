"""Backbone: feature shapes and strides, mask resizing, frozen parts, weight loading (never downloads)."""

from __future__ import annotations

import socket
import time
import urllib.error

import pytest
import torch
import torchvision
from helpers import parse_tiny_args
from torchvision.ops import FrozenBatchNorm2d

import models
from models import backbone as backbone_module
from models.backbone import Backbone, Joiner
from models.backbone import build_backbone as build_backbone_of_settings
from util.misc import nested_tensor_from_tensor_list


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state dict (with ordinary BatchNorm, num_batches_tracked included) on disk."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def build_backbone(args, **kwargs) -> Joiner:
    """The DETR family's backbone of parsed flags (all four stages with --masks, as DETR's build asks)."""
    settings = models.FAMILIES["detr"].make_settings(vars(args))
    return build_backbone_of_settings(settings, return_interm_layers=settings.masks, **kwargs)


def test_last_stage_output_and_mask_resizing():
    body = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False, weights="none")
    nested = nested_tensor_from_tensor_list([torch.rand(3, 64, 128), torch.rand(3, 64, 64)])
    features = body(nested)
    assert list(features) == ["0"]
    feature = features["0"]
    assert feature.tensors.shape == (2, 512, 2, 4) and feature.mask.shape == (2, 2, 4)
    assert not feature.mask[0].any()
    assert not feature.mask[1, :, :2].any() and feature.mask[1, :, 2:].all()


def test_all_stages_with_masks_and_joiner_positions(tiny_args):
    joiner = build_backbone(tiny_args("--masks"))
    assert isinstance(joiner, Joiner) and joiner.num_channels == 512
    features, positions = joiner(nested_tensor_from_tensor_list([torch.rand(3, 64, 96)]))
    shapes = [tuple(f.tensors.shape) for f in features]
    assert shapes == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert [tuple(p.shape) for p in positions] == [(1, 32, h, w) for _, _, h, w in shapes]
    assert all(f.mask.shape == f.tensors.shape[:1] + f.tensors.shape[2:] for f in features)


def test_dilation_gives_stride_16():
    with torch.device("meta"):  # shapes only: skips initialising 25M parameters
        body = Backbone("resnet50", train_backbone=False, return_interm_layers=False, dilation=True, weights="none")
        out = body(nested_tensor_from_tensor_list([torch.rand(3, 64, 64)]))["0"]
    assert out.tensors.shape == (1, 2048, 4, 4) and body.body.layer4[0].conv2.dilation == (1, 1)
    assert body.body.layer4[1].conv2.dilation == (2, 2) and body.body.layer3[1].conv2.dilation == (1, 1)
    with pytest.raises(ValueError, match="resnet152"):
        Backbone("resnet152", train_backbone=True, return_interm_layers=False, dilation=False, weights="none")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dilated_last_stage_is_the_strided_one_sampled_at_even_positions(name):
    """A trous identity: same weights, dilation instead of stride -> the strided output at every other cell."""
    torch.manual_seed(0)
    strided = Backbone(name, train_backbone=False, return_interm_layers=False, dilation=False, weights="none")
    dilated = Backbone(name, train_backbone=False, return_interm_layers=False, dilation=True, weights="none")
    dilated.load_state_dict(strided.state_dict())
    images = nested_tensor_from_tensor_list([torch.rand(3, 96, 128)])
    with torch.no_grad():
        coarse, fine = strided(images)["0"].tensors, dilated(images)["0"].tensors
    assert coarse.shape[-2:] == (3, 4) and fine.shape[-2:] == (6, 8)
    torch.testing.assert_close(fine[..., ::2, ::2], coarse, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fine[..., 1::2, 1::2], coarse, rtol=1e-2, atol=1e-2)  # odd cells are new


@pytest.mark.parametrize(("stages", "channels", "stride"), [(2, 128, 8), (3, 256, 16)])
def test_fewer_stages_give_the_full_networks_intermediate_features(resnet18_file, stages, channels, stride):
    """--backbone_stages N: torchvision's own resnet18 run up to layerN (independent forward) gives the features;
    later stages and their weights are gone."""
    path, state = resnet18_file
    body = Backbone("resnet18", False, False, False, weights=str(path), stages=stages)
    assert body.num_channels == channels
    assert not any(k.startswith(("layer4", f"layer{stages + 1}")) for k in body.state_dict())
    reference = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    reference.load_state_dict({k: v for k, v in state.items() if "num_batches" not in k})
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        for layer in [reference.layer1, reference.layer2, reference.layer3][:stages]:
            expected = layer(expected)
        got = body(nested_tensor_from_tensor_list(list(images)))["0"].tensors
    assert got.shape == (1, channels, 64 // stride, 96 // stride)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dilation_applies_to_the_last_kept_stage(name):
    with torch.device("meta"):
        body = Backbone(name, False, False, dilation=True, weights="none", stages=3)
        out = body(nested_tensor_from_tensor_list([torch.rand(3, 64, 64)]))["0"]
    assert out.tensors.shape[-2:] == (8, 8) and body.body.layer3[1].conv2.dilation == (2, 2)
    assert body.body.layer2[1].conv2.dilation == (1, 1)


def test_fewer_stages_reject_masks_and_bad_counts(tiny_args):
    with pytest.raises(ValueError, match="--masks needs all four"):
        build_backbone(tiny_args("--masks", "--backbone_stages", "3"))
    with pytest.raises(ValueError, match="--backbone_stages 5"):
        Backbone("resnet18", False, False, False, weights="none", stages=5)


@pytest.mark.parametrize("lr_backbone", ["1e-5", "0"])
def test_frozen_parts(tiny_args, lr_backbone):
    body = build_backbone(tiny_args("--lr_backbone", lr_backbone))[0].body
    trainable = {n for n, p in body.named_parameters() if p.requires_grad}
    expected = {n for n, _ in body.named_parameters() if n.split(".")[0] in ("layer2", "layer3", "layer4")}
    assert trainable == (expected if lr_backbone != "0" else set())
    assert expected  # layer2-4 do have parameters
    norms = [m for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen = [m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert not norms and len(frozen) == 20 and all(m.eps == 1e-5 for m in frozen)


def test_weights_from_local_path(resnet18_file):
    path, state = resnet18_file
    body = Backbone("resnet18", True, False, False, weights=str(path)).body
    torch.testing.assert_close(body.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(body.bn1.running_mean, state["bn1.running_mean"])
    torch.testing.assert_close(body.layer4[1].bn2.weight, state["layer4.1.bn2.weight"])


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_bad_weight_files_raise_clear_errors(tmp_path, resnet18_file):
    with pytest.raises(FileNotFoundError, match="--backbone_weights"):
        Backbone("resnet18", True, False, False, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not a resnet34 state dict"), torch.device("meta"):
        Backbone("resnet34", True, False, False, weights=str(resnet18_file[0]))


def test_imagenet_offline_fails_fast_with_one_line(monkeypatch, tmp_path):
    seen_timeouts = []

    def offline(url, **kwargs):
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    before = socket.getdefaulttimeout()
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        build_backbone(parse_tiny_args("--backbone_weights", "imagenet"))
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message and "--backbone_weights none" in message and "resnet18" in message
    assert seen_timeouts == [backbone_module.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


def test_imagenet_from_hub_cache_without_network(monkeypatch, tmp_path, resnet18_file):
    path, state = resnet18_file
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / path.name).symlink_to(path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("must not download"))
    body = build_backbone(parse_tiny_args("--backbone_weights", "imagenet"))[0].body
    torch.testing.assert_close(body.conv1.weight, state["conv1.weight"])


def test_mask_downsampling_equals_nearest_interpolation():
    from models.backbone import _downsample_mask_nearest

    generator = torch.Generator().manual_seed(0)
    for height, width, stride in [(30, 60, 32), (61, 17, 16), (128, 96, 8), (7, 5, 4), (100, 33, 32)]:
        mask = torch.rand(2, height, width, generator=generator) > 0.5
        size = (-(-height // stride), -(-width // stride))
        expected = torch.nn.functional.interpolate(mask[None].float(), size=size, mode="nearest")[0].bool()
        assert torch.equal(_downsample_mask_nearest(mask, size), expected)


def test_frozen_batchnorm_equals_torchvision_and_keeps_bf16():
    from models.backbone import FrozenBatchNorm2d as ProjectFrozenBN

    ours, reference = ProjectFrozenBN(8, eps=1e-5), FrozenBatchNorm2d(8, eps=1e-5)
    for module in (ours, reference):
        module.weight.copy_(torch.linspace(0.5, 2.0, 8))
        module.bias.copy_(torch.linspace(-1.0, 1.0, 8))
        module.running_mean.copy_(torch.linspace(-0.3, 0.3, 8))
        module.running_var.copy_(torch.linspace(0.1, 4.0, 8))
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-6, atol=1e-6)
    assert ours(x.bfloat16()).dtype == torch.bfloat16
    assert list(ours.state_dict()) == list(reference.state_dict())
