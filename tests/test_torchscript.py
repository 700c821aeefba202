"""torch.jit.script of the published scriptable parts: scripted outputs equal the eager ones bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torch import Tensor, nn

from models import build_model
from models.backbone import Backbone, BackboneBase, FrozenBatchNorm2d, Joiner
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from util.misc import NestedTensor, nested_tensor_from_tensor_list

# torch.jit.script is deprecated upstream (FutureWarning); it is still the published deployment path.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _batch() -> NestedTensor:
    """Two images of different sizes: the second row of the batch is padded on the right."""
    return nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 96)])


def _roundtrip(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Saved and loaded again. The loaded module takes tensors or lists of tensors: a Python NestedTensor cannot be
    converted to the loaded copy of the TorchScript class (a TorchScript limitation, the same for the published
    model), so deployments pass image lists (see ``_ListInput``)."""
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _assert_outputs_equal(eager: dict, scripted: dict, keys: tuple[str, ...]) -> None:
    assert set(scripted) == set(keys)
    for key in keys:
        assert torch.equal(eager[key], scripted[key]), key


@pytest.mark.parametrize(
    "module",
    [
        PositionEmbeddingSine(16, normalize=True),
        PositionEmbeddingSine(16),
        PositionEmbeddingSine(16, 20.0, True, 3.0, offset=-0.5, temperature_w=40.0),
        PositionEmbeddingLearned(16),
    ],
    ids=["sine", "sine-unnormalised", "sine-offset-hw", "learned"],
)
def test_position_encodings_script(module):
    samples = nested_tensor_from_tensor_list([torch.rand(8, 20, 20), torch.rand(8, 20, 30)])
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(samples), module(samples))
    assert torch.equal(scripted(NestedTensor(samples.tensors, None)), module(NestedTensor(samples.tensors, None)))


@pytest.mark.parametrize("dilation", [False, True])
def test_backbone_and_joiner_script(dilation):
    backbone = Backbone("resnet18", True, True, dilation, weights="none")
    joiner = Joiner(backbone, PositionEmbeddingSine(16, normalize=True)).eval()
    scripted = torch.jit.script(joiner)
    samples = _batch()
    features, positions = joiner(samples)
    features_s, positions_s = scripted(samples)
    assert len(features_s) == 4
    for feature, feature_s in zip(features, features_s):
        assert torch.equal(feature.tensors, feature_s.tensors)
        assert torch.equal(feature.mask, feature_s.mask)
    for position, position_s in zip(positions, positions_s):
        assert torch.equal(position, position_s)


def test_backbone_base_published_signature():
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    base = BackboneBase(resnet, True, 512, False)
    assert base.num_channels == 512 and base.stage_channels == [512]
    trainable = {name.split(".")[0] for name, p in base.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    out = torch.jit.script(base)(_batch())
    assert list(out) == ["0"] and out["0"].tensors.shape == (2, 512, 2, 3)
    assert BackboneBase(resnet, False, 512, True).stage_channels == [64, 128, 256, 512]


@pytest.mark.parametrize("extra", [(), ("--pre_norm",), ("--attention", "math")], ids=["post-norm", "pre-norm", "math"])
def test_detection_model_script(tiny_args, extra):
    model = build_model(tiny_args(*extra))[0].eval()
    scripted = torch.jit.script(model)
    samples = _batch()
    with torch.no_grad():
        eager = model(samples)
        _assert_outputs_equal(eager, scripted(samples), ("pred_logits", "pred_boxes"))
        images = torch.rand(2, 3, 64, 64)  # a plain batch and a list of images are padded inside, as published
        _assert_outputs_equal(model(images), scripted(images), ("pred_logits", "pred_boxes"))
        image_list = [torch.rand(3, 64, 64), torch.rand(3, 48, 80)]
        _assert_outputs_equal(model(image_list), scripted(image_list), ("pred_logits", "pred_boxes"))
        _assert_outputs_equal(model(image_list), _roundtrip(scripted)(image_list), ("pred_logits", "pred_boxes"))
    assert "aux_outputs" in eager  # eager keeps the auxiliary outputs; the scripted model returns tensors only


def test_panoptic_model_script(tiny_args):
    model = build_model(tiny_args("--masks", "--dataset_file", "coco_panoptic"))[0].eval()
    scripted = torch.jit.script(model)
    samples = _batch()
    image_list = [torch.rand(3, 64, 64), torch.rand(3, 48, 80)]
    keys = ("pred_logits", "pred_boxes", "pred_masks")
    with torch.no_grad():
        _assert_outputs_equal(model(samples), scripted(samples), keys)
        _assert_outputs_equal(model(image_list), _roundtrip(scripted)(image_list), keys)


class _ListInput(nn.Module):
    """The published deployment wrapper: a list of [3, H_i, W_i] images in, padded inside the scripted graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: list[Tensor]):
        return self.model(nested_tensor_from_tensor_list(inputs))


def test_list_of_tensors_wrapper_script(tiny_args):
    wrapper = _ListInput(build_model(tiny_args())[0]).eval()
    scripted = torch.jit.script(wrapper)
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 72)]
    with torch.no_grad():
        _assert_outputs_equal(wrapper(images), scripted(images), ("pred_logits", "pred_boxes"))


def test_nested_tensor_from_tensor_list_script():
    scripted = torch.jit.script(nested_tensor_from_tensor_list)
    images = [torch.rand(3, 5, 7), torch.rand(3, 9, 4)]
    eager, script = nested_tensor_from_tensor_list(images, 4), scripted(images, 4)
    assert script.tensors.shape == (2, 3, 12, 8)
    assert torch.equal(eager.tensors, script.tensors) and torch.equal(eager.mask, script.mask)
    with pytest.raises(Exception, match=r"expected \[C, H, W\] images"):
        scripted([torch.rand(3, 4)])


@pytest.mark.parametrize("extra", [("--spatial_prior", "gaussian"), ("--box_refine",)])
def test_eager_only_decoder_options_refuse_scripting(tiny_args, extra):
    model = build_model(tiny_args(*extra))[0].eval()
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(model)
