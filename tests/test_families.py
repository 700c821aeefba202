"""The table of families: rows, settings against the parser, state-dict recognition and architecture read-back."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import models
from models.family import Family

FAMILY_RUN_FLAGS = {
    "detr": (),
    "deformable_detr": ("--model", "deformable_detr"),
    "dino": ("--model", "dino", "--dn_number", "4", "--num_select", "20"),
    "rtdetrv2": ("--model", "rtdetrv2", "--backbone", "presnet18vd", "--enc_hidden_dim", "32", "--dn_number", "4",
                 "--eval_spatial_size", "64", "64"),
}  # fmt: skip


def test_table_rows():
    assert list(models.FAMILIES) == ["detr", "deformable_detr", "dino", "rtdetrv2"]
    for name, family in models.FAMILIES.items():
        assert isinstance(family, Family) and family.name == name
        if name != "rtdetrv2":  # published remap_mscoco_category: COCO's 80 categories as labels 0..79
            assert family.default_num_classes == {"coco": 91, "synthetic": 91, "coco_panoptic": 250}
    assert models.FAMILIES["rtdetrv2"].default_num_classes == {"coco": 80, "synthetic": 6}
    assert [f.title for f in models.FAMILIES.values()] == ["DETR", "Deformable DETR", "DINO", "RT-DETRv2"]


def test_settings_fields_are_parser_destinations_and_frozen(tiny_args):
    destinations = set(vars(tiny_args()))
    for family in models.FAMILIES.values():
        assert family.flags <= destinations, sorted(family.flags - destinations)
        settings = family.make_settings(vars(tiny_args(*FAMILY_RUN_FLAGS[family.name])))
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.hidden_dim = 64
    # Each family reads its own flags only.
    assert "dn_number" not in models.FAMILIES["deformable_detr"].flags
    assert {"eos_coef", "masks", "pre_norm"} <= models.FAMILIES["detr"].flags
    assert "eos_coef" not in models.FAMILIES["dino"].flags and "two_stage" not in models.FAMILIES["dino"].flags


def test_make_settings_names_a_missing_flag(tiny_args):
    values = vars(tiny_args())
    del values["hidden_dim"]
    with pytest.raises(KeyError, match="--hidden_dim"):
        models.FAMILIES["detr"].make_settings(values)


def test_published_defaults_of_each_family(tiny_args):
    """Written from DESIGN_DEFORMABLE.md / DESIGN_DINO.md (the published configs)."""
    assert models.FAMILIES["detr"].defaults == {}
    deformable = models.FAMILIES["deformable_detr"].defaults
    assert (deformable["lr"], deformable["lr_backbone"], deformable["epochs"], deformable["lr_drop"]) == (
        2e-4,
        2e-5,
        50,
        40,
    )
    assert (deformable["num_queries"], deformable["dim_feedforward"], deformable["cls_loss_coef"]) == (300, 1024, 2.0)
    assert deformable["lr_linear_proj_names"] == ["reference_points", "sampling_offsets"]
    dino = models.FAMILIES["dino"].defaults
    assert (dino["lr"], dino["lr_backbone"], dino["epochs"], dino["lr_drop"]) == (1e-4, 1e-5, 12, 11)
    assert (dino["num_queries"], dino["dim_feedforward"], dino["dropout"], dino["cls_loss_coef"]) == (
        900,
        2048,
        0.0,
        1.0,
    )
    assert dino["set_cost_class"] == 2.0 and dino["position_embedding_scale"] == 2 * math.pi
    for family in models.FAMILIES.values():
        assert set(family.defaults) <= set(vars(tiny_args()))


def test_hub_recipes_are_flag_values_of_the_published_entries(tiny_args):
    destinations = set(vars(tiny_args()))
    names = [name for family in models.FAMILIES.values() for name in family.hub_recipes]
    assert len(names) == 7 + 5 + 2 + 5 and len(set(names)) == len(names)
    for family in models.FAMILIES.values():
        for name, recipe in family.hub_recipes.items():
            assert name.startswith(family.name) and set(recipe) <= destinations, name
    detr = models.FAMILIES["detr"].hub_recipes
    assert detr["detr_resnet101_dc5"] == {"backbone": "resnet101", "dilation": True, "masks": False,
                                          "dataset_file": "coco"}  # fmt: skip
    assert detr["detr_resnet50_panoptic"]["dataset_file"] == "coco_panoptic"
    assert models.FAMILIES["deformable_detr"].hub_recipes["deformable_detr_resnet50_two_stage"] == {
        "with_box_refine": True, "two_stage": True,
    }  # fmt: skip
    assert models.FAMILIES["dino"].hub_recipes["dino_resnet50_5scale"]["return_interm_indices"] == [0, 1, 2, 3]


def test_unknown_model_is_refused(tiny_args):
    args = tiny_args()
    args.model = "yolo"
    with pytest.raises(ValueError, match="--model yolo"):
        models.build_model(args)


CASES = [
    ("detr", ()),
    ("detr", ("--masks", "--pre_norm", "--position_embedding", "learned")),
    ("deformable_detr", ("--model", "deformable_detr")),
    ("deformable_detr", ("--model", "deformable_detr", "--with_box_refine", "--two_stage")),
    ("dino", FAMILY_RUN_FLAGS["dino"]),
    ("rtdetrv2", FAMILY_RUN_FLAGS["rtdetrv2"]),
]


@pytest.mark.parametrize(("name", "flags"), CASES)
def test_state_dict_family_and_architecture_read_back(name, flags, tiny_args):
    args = tiny_args("--num_classes", "7", "--enc_layers", "2", "--dec_layers", "3", *flags)
    state = models.build_model(args)[0].state_dict()
    assert models.family_of_state_dict(state) == name
    arch = models.FAMILIES[name].architecture(state)
    expected = {"num_classes": 7, "hidden_dim": 32, "dim_feedforward": args.dim_feedforward, "enc_layers": 2,
                "dec_layers": 3, "backbone": "presnet18vd" if name == "rtdetrv2" else "resnet18"}  # fmt: skip
    assert {k: arch[k] for k in expected} == expected
    if name == "detr":
        assert (arch["num_queries"], arch["masks"], arch["pre_norm"]) == (10, args.masks, args.pre_norm)
        assert arch["position_embedding"] == args.position_embedding
    elif name == "rtdetrv2":
        assert (arch["num_feature_levels"], arch["enc_hidden_dim"], arch["eval_spatial_size"]) == (3, 32, [64, 64])
    else:
        assert arch["num_feature_levels"] == 4
    if name == "deformable_detr":
        assert (arch["two_stage"], arch["with_box_refine"]) == (args.two_stage, args.with_box_refine)
        assert arch["num_queries"] == (None if args.two_stage else 10)
    if name == "dino":
        assert (arch["num_queries"], arch["dn_labelbook_size"]) == (10, 7)
    # The architecture alone rebuilds a model the weights load into strictly.
    rebuilt_flags = {**vars(tiny_args(*flags)), **{k: v for k, v in arch.items() if v is not None}}
    rebuilt = models.build_model(type(args)(**rebuilt_flags))[0]
    rebuilt.load_state_dict(state, strict=True)


def test_state_dict_recognition_by_hand():
    weight = torch.zeros(1)
    assert models.family_of_state_dict({"class_embed.weight": weight}) == "detr"
    assert models.family_of_state_dict({"detr.class_embed.weight": weight, "mask_head.lay1.weight": weight}) == "detr"
    assert models.family_of_state_dict({"transformer.level_embed": weight}) == "deformable_detr"
    assert models.family_of_state_dict({"transformer.level_embed": weight, "label_enc.weight": weight}) == "dino"
    assert models.family_of_state_dict({"transformer.level_embed": weight, "transformer.tgt_embed.weight": weight}) == (
        "dino"
    )
    with pytest.raises(ValueError, match="not a DETR checkpoint"):
        models.FAMILIES["detr"].architecture({"transformer.encoder.layers.0.linear1.weight": weight})
    with pytest.raises(ValueError, match="not a dino checkpoint"):
        models.FAMILIES["dino"].architecture({"class_embed.weight": weight})
