"""torch.hub entry points: build offline by default, download the published weights only when asked."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import hubconf
import models
import run.checkpoint
import run.finetune  # noqa: F401 - imported before a test patches run.checkpoint.load_checkpoint (it binds the name)
from models import FAMILIES
from models.postprocess import PostProcess
from run.model_loading import infer_architecture

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {  # name: (backbone, dilation, masks, num_classes)
    "detr_resnet50": ("resnet50", False, False, 91),
    "detr_resnet50_dc5": ("resnet50", True, False, 91),
    "detr_resnet101": ("resnet101", False, False, 91),
    "detr_resnet101_dc5": ("resnet101", True, False, 91),
    "detr_resnet50_panoptic": ("resnet50", False, True, 250),
    "detr_resnet50_dc5_panoptic": ("resnet50", True, True, 250),
    "detr_resnet101_panoptic": ("resnet101", False, True, 250),
}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def recorded_builds(monkeypatch):
    """Replace build_model by a recorder that builds a tiny stand-in (keeps the wiring test fast)."""
    calls = []
    real_build = models.build_model

    def fake_build(args):
        calls.append(vars(args).copy())
        tiny = dict(
            backbone="resnet18",
            dilation=False,
            hidden_dim=16,
            nheads=2,
            enc_layers=1,
            dec_layers=1,
            dim_feedforward=16,
            num_queries=5,
        )
        return real_build(type(args)(**{**vars(args), **tiny}))

    monkeypatch.setattr(models, "build_model", fake_build)
    return calls


def test_every_entry_point_builds_with_its_published_architecture(recorded_builds, no_network):
    for name, (backbone, dilation, masks, num_classes) in ENTRIES.items():
        model, postprocessor = getattr(hubconf, name)(return_postprocessor=True)
        args = recorded_builds[-1]
        assert (args["backbone"], args["dilation"], args["masks"], args["num_classes"]) == (
            backbone,
            dilation,
            masks,
            num_classes,
        ), name
        assert args["backbone_weights"] == "none" and args["aux_loss"] is False
        assert args["num_queries"] == 100 and args["hidden_dim"] == 256 and args["enc_layers"] == 6
        assert hasattr(model, "detr") == masks
        assert type(postprocessor).__name__ == ("PostProcessPanoptic" if masks else "PostProcess")
        if masks:
            assert (
                postprocessor.threshold == 0.85
                and postprocessor.is_thing_map[90]
                and not postprocessor.is_thing_map[91]
            )
    assert set(ENTRIES) == set(hubconf.CHECKPOINT_URLS)


def test_resnet50_builds_offline_with_the_published_size(no_network):
    model = hubconf.detr_resnet50(pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == 41_524_768  # the published DETR-R50 parameter count
    arch = infer_architecture(model.state_dict())
    assert (arch["backbone"], arch["num_classes"], arch["num_queries"], arch["hidden_dim"]) == (
        "resnet50",
        91,
        100,
        256,
    )
    assert (arch["enc_layers"], arch["dec_layers"], arch["dim_feedforward"]) == (6, 6, 2048)
    assert model.aux_loss is False  # the published hub models return the last decoder layer only


def test_pretrained_downloads_the_published_url_and_loads_strictly(monkeypatch, recorded_builds):
    loads = []
    reference = {}

    def fake_load(path_or_url, map_location="cpu", check_hash=False, **kwargs):
        loads.append((path_or_url, check_hash))
        return {"model": reference["state"]}

    monkeypatch.setattr(run.checkpoint, "load_checkpoint", fake_load)
    reference["state"] = hubconf.detr_resnet50().state_dict()
    for value in reference["state"].values():
        value.add_(1)  # distinguishable from a fresh init
    model, postprocessor = hubconf.detr_resnet50(pretrained=True, return_postprocessor=True)
    assert loads == [("https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth", True)]
    assert isinstance(postprocessor, PostProcess)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference["state"][key], rtol=0, atol=0)

    # Another num_classes keeps everything but the class head (fine-tuning start).
    monkeypatch.setattr("run.finetune.load_checkpoint", fake_load)
    model = hubconf.detr_resnet50(pretrained=True, num_classes=3)
    assert model.class_embed.weight.shape[0] == 4
    torch.testing.assert_close(model.query_embed.weight, reference["state"]["query_embed.weight"], rtol=0, atol=0)


def test_torch_hub_load_from_local_folder(recorded_builds, no_network):
    model = torch.hub.load(str(ROOT), "detr_resnet101_dc5", source="local", trust_repo=True)
    assert isinstance(model, torch.nn.Module)
    assert (recorded_builds[-1]["backbone"], recorded_builds[-1]["dilation"]) == ("resnet101", True)
    with pytest.raises(TypeError, match="unknown model option 'num_querys'"):
        hubconf.detr_resnet50(num_querys=5)


# ------------------------------------------------------------------------------------- Deformable DETR

DEFORMABLE_ENTRIES = {  # name: (num_feature_levels, dilation, with_box_refine, two_stage)
    "deformable_detr_resnet50": (4, False, False, False),
    "deformable_detr_resnet50_single_scale": (1, False, False, False),
    "deformable_detr_resnet50_single_scale_dc5": (1, True, False, False),
    "deformable_detr_resnet50_refine": (4, False, True, False),
    "deformable_detr_resnet50_two_stage": (4, False, True, True),
}
TINY_DEFORMABLE = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
                       num_queries=5, enc_n_points=1, dec_n_points=1)  # fmt: skip


@pytest.fixture
def recorded_deformable_builds(monkeypatch):
    """build_model recorder building a tiny stand-in of the requested recipe (GroupNorm(32): hidden 32)."""
    calls = []
    real_build = models.build_model

    def fake_build(args):
        calls.append(vars(args).copy())
        return real_build(type(args)(**{**vars(args), **TINY_DEFORMABLE}))

    monkeypatch.setattr(models, "build_model", fake_build)
    return calls


def test_every_deformable_entry_builds_its_published_recipe_offline(recorded_deformable_builds, no_network):
    from models.postprocess import PostProcessTopK

    for name, (levels, dilation, refine, two_stage) in DEFORMABLE_ENTRIES.items():
        model, postprocessor = getattr(hubconf, name)(return_postprocessor=True)
        args = recorded_deformable_builds[-1]
        assert args["model"] == "deformable_detr", name
        assert (args["num_feature_levels"], args["dilation"], args["with_box_refine"], args["two_stage"]) == (
            levels, dilation, refine, two_stage
        ), name  # fmt: skip
        # The family's published defaults, not DETR's.
        assert (args["num_queries"], args["dim_feedforward"], args["lr"], args["num_classes"]) == (300, 1024, 2e-4, 91)
        assert args["backbone"] == "resnet50" and args["backbone_weights"] == "none" and args["aux_loss"] is False
        assert isinstance(postprocessor, PostProcessTopK) and postprocessor.num_select == 100
        assert model.two_stage == two_stage and model.with_box_refine == refine
        assert model.transformer.level_embed.shape[0] == levels
    assert set(DEFORMABLE_ENTRIES) == set(FAMILIES["deformable_detr"].hub_recipes)


@pytest.mark.parametrize(
    "name, trainable", [("deformable_detr_resnet50", 39_847_265), ("deformable_detr_resnet50_two_stage", 40_959_129)]
)
def test_deformable_resnet50_has_the_published_size(no_network, name, trainable):
    model = getattr(hubconf, name)()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable  # published counts
    assert infer_architecture(model.state_dict())["num_classes"] == 91


def test_deformable_pretrained_needs_a_local_checkpoint(recorded_deformable_builds, no_network, tmp_path):
    with pytest.raises(ValueError, match=r"no direct download URL .*checkpoint='path/to/file.pth'"):
        hubconf.deformable_detr_resnet50_refine(pretrained=True)
    assert recorded_deformable_builds == []  # refused before building anything

    reference = hubconf.deformable_detr_resnet50_refine().state_dict()
    for value in reference.values():
        value.add_(1)  # distinguishable from a fresh init (shared tensors move once per key: still consistent)
    path = tmp_path / "refine.pth"
    torch.save({"model": reference}, path)
    model = hubconf.deformable_detr_resnet50_refine(pretrained=True, checkpoint=str(path))
    assert recorded_deformable_builds[-1]["backbone_weights"] == "none"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)

    # Another num_classes: a fine-tuning start; the class heads keep the focal prior of a fresh build.
    model = hubconf.deformable_detr_resnet50_refine(checkpoint=str(path), num_classes=3)
    assert model.class_embed[1].weight.shape == (3, 32)
    torch.testing.assert_close(model.class_embed[1].bias, torch.full((3,), -math.log(99)))
    torch.testing.assert_close(model.query_embed.weight, reference["query_embed.weight"], rtol=0, atol=0)


def test_torch_hub_load_of_a_deformable_entry(recorded_deformable_builds, no_network):
    model = torch.hub.load(str(ROOT), "deformable_detr_resnet50_two_stage", source="local", trust_repo=True)
    assert model.two_stage and recorded_deformable_builds[-1]["model"] == "deformable_detr"
    with pytest.raises(TypeError, match="unknown model option 'two_stages'"):
        hubconf.deformable_detr_resnet50(two_stages=True)


# ------------------------------------------------------------------------------------- DINO

DINO_ENTRIES = {"dino_resnet50_4scale": (4, [1, 2, 3]), "dino_resnet50_5scale": (5, [0, 1, 2, 3])}


def test_every_dino_entry_builds_its_published_recipe_offline(recorded_deformable_builds, no_network):
    from models.postprocess import PostProcessTopK

    for name, (levels, stages) in DINO_ENTRIES.items():
        model, postprocessor = getattr(hubconf, name)(return_postprocessor=True)
        args = recorded_deformable_builds[-1]
        assert args["model"] == "dino" and args["num_feature_levels"] == levels, name
        assert list(args["return_interm_indices"]) == stages, name
        # The family's published 4-scale defaults.
        assert (args["num_queries"], args["dim_feedforward"], args["lr"], args["lr_backbone"], args["dn_number"]) == (
            900, 2048, 1e-4, 1e-5, 100
        ), name  # fmt: skip
        assert args["num_classes"] == 91 and args["backbone"] == "resnet50" and args["backbone_weights"] == "none"
        assert isinstance(postprocessor, PostProcessTopK) and postprocessor.num_select == 300
        assert model.transformer.level_embed.shape[0] == levels and model.label_enc.num_embeddings == 92
    assert set(DINO_ENTRIES) == set(FAMILIES["dino"].hub_recipes)


@pytest.mark.parametrize("name", list(DINO_ENTRIES))
def test_dino_resnet50_has_the_published_size(no_network, name):
    model = getattr(hubconf, name)()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 47  # "47M" in the DINO paper's tables
    arch = infer_architecture(model.state_dict())
    assert (arch["num_classes"], arch["num_queries"], arch["dn_labelbook_size"]) == (91, 900, 91)
    assert arch["num_feature_levels"] == DINO_ENTRIES[name][0]


def test_dino_pretrained_needs_a_local_checkpoint(recorded_deformable_builds, no_network, tmp_path):
    with pytest.raises(ValueError, match=r"no direct download URL .*IDEA-Research/DINO.*checkpoint="):
        hubconf.dino_resnet50_4scale(pretrained=True)
    assert recorded_deformable_builds == []

    reference = hubconf.dino_resnet50_4scale().state_dict()
    for value in reference.values():
        value.add_(1)
    path = tmp_path / "dino.pth"
    torch.save({"model": reference}, path)
    model = hubconf.dino_resnet50_4scale(pretrained=True, checkpoint=str(path))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)

    # Another num_classes: class heads and label_enc re-initialised (label book 3 + 1), the rest loaded.
    model = hubconf.dino_resnet50_4scale(checkpoint=str(path), num_classes=3)
    assert model.class_embed[1].weight.shape == (3, 32) and model.label_enc.weight.shape == (4, 32)
    assert model.class_embed[0] is model.class_embed[1] is model.transformer.decoder.class_embed[0]
    torch.testing.assert_close(model.transformer.enc_out_class_embed.bias, torch.full((3,), -math.log(99)))
    tgt = reference["transformer.tgt_embed.weight"]
    torch.testing.assert_close(model.transformer.tgt_embed.weight, tgt, rtol=0, atol=0)


def test_torch_hub_load_of_a_dino_entry(recorded_deformable_builds, no_network):
    model = torch.hub.load(str(ROOT), "dino_resnet50_5scale", source="local", trust_repo=True)
    assert model.transformer.level_embed.shape[0] == 5 and recorded_deformable_builds[-1]["model"] == "dino"
    with pytest.raises(TypeError, match="unknown model option 'dn_numbr'"):
        hubconf.dino_resnet50_4scale(dn_numbr=3)
