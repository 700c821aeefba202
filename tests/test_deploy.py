"""models.deploy: conv + norm folding, fuse_for_inference hooks and channels_last inference copies.

Oracles: the fold of one channel written out by hand; a hand-made module whose foldable pairs are counted by hand
(and decoys that must stay); every family of the table built tiny, its norms set to the statistics of real
activations, compared before and after preparation (1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILY_FLAGS, parse_tiny_args
from torch import nn
from torchvision import ops

from models import build_model
from models.backbone import Backbone
from models.deploy import fold_conv_norm, fold_conv_norms_, prepare_for_inference
from models.feature_maps import FrozenBatchNorm2d
from util.misc import nested_tensor_from_tensor_list

TOL = 1e-5
NORMS = (nn.BatchNorm2d, ops.FrozenBatchNorm2d)


def set_norm_statistics_(model: nn.Module, run) -> nn.Module:
    """Give every BatchNorm2d / FrozenBatchNorm2d the per-channel mean and variance of its input on ``run(model)``
    plus a small random affine: features stay O(1) (random statistics blow them up) and every norm matters."""
    generator = torch.Generator().manual_seed(11)

    def calibrate(norm: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().float()
        if norm.running_mean is None:  # a BatchNorm2d without statistics: its affine only
            return
        norm.running_mean.copy_(x.mean((0, 2, 3)))
        norm.running_var.copy_(x.var((0, 2, 3)))
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=generator))
        norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=generator))

    handles = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, NORMS)]
    model.eval()
    with torch.no_grad():
        run(model)
    for handle in handles:
        handle.remove()
    return model


def norm_count(model: nn.Module) -> int:
    return sum(isinstance(m, NORMS) for m in model.modules())


def test_fold_of_one_channel_by_hand():
    conv = nn.Conv2d(1, 1, 1, bias=True)
    norm = nn.BatchNorm2d(1, eps=0.5).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(1.5)
        norm.weight.fill_(4.0)
        norm.bias.fill_(-1.0)
    weight, bias = fold_conv_norm(conv, norm)
    # y = 4 * (2x + 1 - 3) / sqrt(1.5 + 0.5) - 1 = (8 / sqrt 2) x - 8 / sqrt 2 - 1
    assert weight.item() == pytest.approx(8 / math.sqrt(2))
    assert bias.item() == pytest.approx(-8 / math.sqrt(2) - 1)
    frozen = FrozenBatchNorm2d(1, eps=0.5)
    frozen.load_state_dict({k: v for k, v in norm.state_dict().items() if k != "num_batches_tracked"}, strict=True)
    assert fold_conv_norm(conv, frozen)[1].item() == pytest.approx(-8 / math.sqrt(2) - 1)
    with pytest.raises(ValueError, match="cannot fold a GroupNorm"):
        fold_conv_norm(conv, nn.GroupNorm(1, 1))


class _BatchNormAct(nn.BatchNorm2d):
    """A norm subclass with behaviour after the affine (like timm's BatchNormAct2d): must not be folded."""

    def forward(self, x):
        return F.relu(super().forward(x))


class HandMade(nn.Module):
    """Five foldable pairs (marked) and four decoys."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # pair 1: conv / norm
        self.norm = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # pair 2: conv1 / bn1 (biased conv)
        self.bn1 = ops.FrozenBatchNorm2d(8)
        self.seq = nn.Sequential(
            nn.Conv2d(8, 8, 1, bias=False),  # pair 3: consecutive in a Sequential
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),  # pair 4: grouped
            FrozenBatchNorm2d(8),
            nn.Conv2d(8, 8, 1),  # decoy: ReLU between conv and norm
            nn.ReLU(),
            nn.BatchNorm2d(8),
        )
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)  # pair 5: conv2 / bn2
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)  # decoy: its norm has no running statistics
        self.bn3 = nn.BatchNorm2d(8, track_running_stats=False)
        self.conv4 = nn.Conv2d(8, 8, 1, bias=False)  # decoy: norm with an activation
        self.bn4 = _BatchNormAct(8)
        self.conv5 = nn.Conv2d(8, 8, 1, bias=False)  # decoy: name without a matching bn5
        self.bn6 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.norm(self.conv(x)))
        x = self.seq(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = self.bn4(self.bn3(self.conv3(x)))
        return self.bn6(self.conv4(self.conv5(x)))


def test_hand_made_module_folds_exactly_its_pairs():
    model = set_norm_statistics_(HandMade(), lambda m: m(torch.rand(4, 3, 16, 16)))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    prepared = prepare_for_inference(model)
    assert prepared.folded_conv_norms == 5
    assert isinstance(prepared.norm, nn.Identity) and isinstance(prepared.bn1, nn.Identity)
    assert isinstance(prepared.seq[1], nn.Identity) and isinstance(prepared.seq[4], nn.Identity)
    assert isinstance(prepared.bn2, nn.Identity)
    # The decoys stay as they were.
    assert type(prepared.seq[7]) is nn.BatchNorm2d and type(prepared.bn3) is nn.BatchNorm2d
    assert type(prepared.bn4) is _BatchNormAct and type(prepared.bn6) is nn.BatchNorm2d
    assert prepared.seq[3].groups == 2 and prepared.seq[3].bias is not None
    assert prepared.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), expected, atol=TOL, rtol=0)
        torch.testing.assert_close(prepared(x.contiguous(memory_format=torch.channels_last)), expected, atol=TOL,
                                   rtol=0)  # fmt: skip
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())


def test_source_model_and_state_dict_untouched():
    model = set_norm_statistics_(HandMade(), lambda m: m(torch.rand(4, 3, 16, 16))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].is_contiguous(), key  # channels_last applied to the copy only
    assert model.training and isinstance(model.norm, nn.BatchNorm2d) and prepared.norm is not model.norm
    assert norm_count(model) == 9
    # Training still updates the source's statistics: nothing was frozen or shared.
    model(torch.rand(2, 3, 16, 16))
    assert not torch.equal(model.norm.running_mean, before["norm.running_mean"])


def test_fold_count_on_a_resnet18_backbone():
    """torchvision ResNet-18 with FrozenBatchNorm2d (DETR's backbone): every norm follows its conv (20 pairs)."""
    backbone = Backbone("resnet18", True, True, False, weights="none")
    images = torch.rand(2, 3, 96, 96)
    set_norm_statistics_(backbone, lambda m: m(nested_tensor_from_tensor_list(list(images))))
    with torch.no_grad():
        expected = backbone(nested_tensor_from_tensor_list(list(images)))
    copy = prepare_for_inference(backbone, channels_last=False)
    assert norm_count(backbone) == 20 and copy.folded_conv_norms == 20 and norm_count(copy) == 0
    with torch.no_grad():
        got = copy(nested_tensor_from_tensor_list(list(images)))
    for name in expected:
        # Feature maps reach ~10 (float32 rounding of the reordered sums then ~1e-6 of that): 1e-5 of their scale.
        scale = float(expected[name].tensors.abs().max())
        torch.testing.assert_close(got[name].tensors, expected[name].tensors, atol=TOL * scale, rtol=0)
        assert torch.equal(got[name].mask, expected[name].mask)


def test_a_missed_pair_is_counted():
    model = set_norm_statistics_(HandMade(), lambda m: m(torch.rand(4, 3, 16, 16)))
    model.seq[0] = nn.Sequential(model.seq[0])  # hides pair 3 from every rule
    assert fold_conv_norms_(model) == 4


@pytest.mark.parametrize("family", sorted(FAMILY_FLAGS))
def test_prepared_family_model_gives_the_same_detections(family):
    """Each family's conv -> norm pairs really are applied in that order: outputs equal, no norm left.

    In float64, so that 1e-5 measures the folding, not float32 rounding amplified by the transformer.
    """
    model, _, _ = build_model(parse_tiny_args(*FAMILY_FLAGS[family]))
    model.double()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(m):
        return m(nested_tensor_from_tensor_list(list(images)))

    set_norm_statistics_(model, run)
    with torch.no_grad():
        expected = run(model)
    prepared = prepare_for_inference(model)
    assert norm_count(prepared) == 0
    assert prepared.folded_conv_norms > 0
    with torch.no_grad():
        got = run(prepared)
    for name in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_timm_backbones_keep_their_features(name):
    """timm modules reuse the names (conv1/bn1, ...) and BatchNormAct2d subclasses: whatever is folded must be a
    real pair (features equal) and the norms with an activation must stay."""
    pytest.importorskip("timm")
    from models.timm_backbone import FrozenBatchNormAct2d, build_timm_backbone

    backbone = build_timm_backbone(f"timm:{name}", (1, 2, 3))
    images = nested_tensor_from_tensor_list(list(torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))))
    set_norm_statistics_(backbone, lambda m: m(images))
    with torch.no_grad():
        expected = backbone(images)
    prepared = prepare_for_inference(backbone)
    acts = sum(type(m) is FrozenBatchNormAct2d for m in backbone.modules())
    assert sum(type(m) is FrozenBatchNormAct2d for m in prepared.modules()) == acts
    # timm's deep stem: conv1 is a Sequential ending in a conv, bn1 follows it; not a recognised pair, left as is.
    left = [n for n, m in prepared.named_modules() if isinstance(m, NORMS) and type(m) is not FrozenBatchNormAct2d]
    assert left == (["body.bn1"] if name == "test_resnet" else [])
    assert prepared.folded_conv_norms == norm_count(backbone) - acts - len(left)  # 14, 0, 0
    with torch.no_grad():
        got = prepared(images)
    for key, value in expected.items():
        scale = float(value.tensors.abs().max())
        torch.testing.assert_close(got[key].tensors, value.tensors, atol=TOL * scale, rtol=0)
