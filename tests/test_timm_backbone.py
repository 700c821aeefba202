"""timm backbones: tiny timm models of three families (ResNet, ConvNeXt, EfficientNet) built offline."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import FrozenBatchNorm2d, Joiner
from models.position_encoding import PositionEmbeddingSine
from models.timm_backbone import build_timm_backbone, parse_timm_name
from util.misc import NestedTensor

timm = pytest.importorskip("timm")

# Expected levels, read off each tiny model's definition: (channels, strides) for return_interm_indices (1, 2, 3).
LEVELS = {
    "test_resnet": ([48, 192, 96], [8, 16, 32]),  # feature_info starts with the stride-2 stem
    "test_convnext": ([32, 48, 64], [8, 16, 32]),
    "test_efficientnet": ([32, 48, 64], [8, 16, 32]),  # feature_info starts at stride 2 too
}


def _randomise_bn_statistics(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


def _full_model_levels(model: nn.Module, images: torch.Tensor, strides: list[int]) -> list[torch.Tensor]:
    """The classification model's own maps at ``strides``: forward hooks on the deepest module per stride."""
    infos = {info["reduction"]: info["module"] for info in model.feature_info}  # later modules overwrite
    captured = {}
    hooks = [
        model.get_submodule(infos[s]).register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s, o))
        for s in strides
    ]
    model(images)
    for hook in hooks:
        hook.remove()
    return [captured[s] for s in strides]


@pytest.mark.parametrize("name", list(LEVELS))
def test_levels_channels_strides_and_masks(name):
    backbone = build_timm_backbone(f"timm:{name}", (1, 2, 3))
    channels, strides = LEVELS[name]
    assert backbone.num_channels == channels and backbone.stage_channels == channels and backbone.strides == strides
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:] = True
    mask[1, :, 50:] = True
    out = backbone(NestedTensor(images, mask))
    assert list(out) == ["0", "1", "2"]
    for level, c, s in zip(out.values(), channels, strides):
        assert level.tensors.shape == (2, c, 64 // s, 96 // s)
        torch.testing.assert_close(level.mask, F.interpolate(mask[None].float(), size=(64 // s, 96 // s)).bool()[0])


def test_all_four_levels_skip_the_stride_two_stem():
    backbone = build_timm_backbone("test_resnet", (0, 1, 2, 3))
    assert backbone.num_channels == [32, 48, 192, 96] and backbone.strides == [4, 8, 16, 32]


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_frozen_batch_norm_matches_eval_mode_and_stays_frozen(name):
    frozen = build_timm_backbone(name, (1, 2, 3))
    live = build_timm_backbone(name, (1, 2, 3), freeze_bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    _randomise_bn_statistics(live)
    frozen.load_state_dict(live.state_dict(), strict=False)  # num_batches_tracked has no frozen counterpart
    images = NestedTensor(torch.randn(2, 3, 64, 64), None)
    live.eval()
    frozen.train()
    for a, b in zip(frozen(images).values(), live(images).values()):
        torch.testing.assert_close(a.tensors, b.tensors)
    before = {k: v.clone() for k, v in frozen.state_dict().items() if "running" in k}
    optimizer = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    sum(level.tensors.sum() for level in frozen(images).values()).backward()
    optimizer.step()
    for key, value in before.items():
        torch.testing.assert_close(frozen.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,suffix", [("test_resnet", ".pth"), ("test_convnext", ".safetensors"), ("test_efficientnet", ".pth")]
)
def test_local_weights_reproduce_the_classification_models_maps(tmp_path, name, suffix):
    torch.manual_seed(7)
    full = timm.create_model(name, pretrained=False)
    _randomise_bn_statistics(full)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    path = str(tmp_path / f"{name}{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(8)
    backbone = build_timm_backbone(name, (1, 2, 3), weights=path).eval()
    images = torch.randn(1, 3, 64, 64)
    expected = _full_model_levels(full.eval(), images, LEVELS[name][1])
    for level, want in zip(backbone(NestedTensor(images, None)).values(), expected):
        torch.testing.assert_close(level.tensors, want)


def test_weights_without_classifier_load_and_bad_files_are_one_line_errors(tmp_path):
    full = timm.create_model("test_resnet", pretrained=False)
    state = full.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")
    build_timm_backbone("test_resnet", (1, 2, 3), weights=str(tmp_path / "no_fc.pth"))
    bad = {
        "missing": (
            {k: v for k, v in state.items() if k != "layer2.0.conv1.weight"},
            "missing ['layer2.0.conv1.weight']",
        ),
        "extra": ({**state, "extra.weight": torch.zeros(1)}, "unexpected ['extra.weight']"),
        "shape": ({**state, "conv1.0.weight": torch.zeros(1, 1, 1, 1)}, "shapes ['conv1.0.weight [1, 1, 1, 1] vs"),
    }
    for case, (bad_state, message) in bad.items():
        torch.save(bad_state, tmp_path / f"{case}.pth")
        with pytest.raises(ValueError) as err:
            build_timm_backbone("test_resnet", (1, 2, 3), weights=str(tmp_path / f"{case}.pth"))
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_timm_backbone("test_resnet", weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="not downloaded"):
        build_timm_backbone("test_resnet", weights="imagenet")
    with pytest.raises(ValueError, match="unknown timm model"):
        build_timm_backbone("timm:no_such_model_xyz")
    with pytest.raises(ValueError, match=r"no stride-8 feature map \(its strides: \[16\]\)"):
        build_timm_backbone("test_vit", (1, 2, 3))
    with pytest.raises(ValueError, match="give a timm model name"):
        parse_timm_name("timm:")
    assert parse_timm_name("resnet50") is None and parse_timm_name("timm:convnext_tiny") == "convnext_tiny"


def test_missing_timm_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ImportError, match=r"^--backbone timm:NAME needs timm: pip install timm$"):
        build_timm_backbone("timm:test_resnet")


def test_joiner_layout_and_backbone_lr_group():
    joiner = Joiner(build_timm_backbone("test_convnext", (1, 2, 3)), PositionEmbeddingSine(16, normalize=True))
    detector = nn.Module()
    detector.backbone = joiner
    names = [n for n, p in detector.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("backbone.0.body.") for n in names)  # the published `backbone.0` lr group
    assert "backbone.0.body.stem_0.weight" in names
    assert joiner.num_channels == 64 and joiner[0].num_channels == [32, 48, 64]
    frozen = build_timm_backbone("test_convnext", (1, 2, 3), train_backbone=False)
    assert not any(p.requires_grad for p in frozen.parameters())
