"""RT-DETRv2 as a family of the framework: its table row, flags, recipe configs, settings and checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from helpers import TINY_FLAGS

import models
from cli.arguments import check_family_flags, get_args_parser
from cli.config import parse_args_with_config

ROOT = Path(__file__).resolve().parents[1]

# A tiny RT-DETRv2 (after the shared tiny flags): R18-vd with trainable BN, width 32, 64 x 64 eval anchors.
RTDETR_TINY = (
    "--model", "rtdetrv2", "--backbone", "presnet18vd", "--freeze_at", "-1", "--no_freeze_norm",
    "--enc_hidden_dim", "32", "--enc_dim_feedforward", "64", "--enc_expansion", "0.5", "--num_select", "10",
    "--dn_number", "4", "--eval_spatial_size", "64", "64",
)  # fmt: skip

# recipe config -> (flag values it sets, keys, trainable elements), from DESIGN_RTDETR.md.
RECIPES = {
    "r18vd_120e": ({"backbone": "presnet18vd", "freeze_at": -1, "freeze_norm": False, "enc_expansion": 0.5,
                    "dec_layers": 3, "epochs": 120, "aug_stop_epoch": 117, "multiscale_sizes": [],
                    "lr_backbone": 1e-4}, 538, 20_184_464),
    "r34vd_120e": ({"backbone": "presnet34vd", "freeze_at": -1, "freeze_norm": False, "enc_expansion": 0.5,
                    "dec_layers": 4, "epochs": 120, "aug_stop_epoch": 117, "multiscale_stop_epoch": 117,
                    "lr_backbone": 5e-5, "bias_weight_decay": 0.0}, 665, 31_441_668),
    "r50vd_6x": ({}, 744, 42_862_860),
    "r50vd_m_7x": ({"enc_expansion": 0.5, "eval_idx": 2, "epochs": 84, "aug_stop_epoch": 81,
                    "multiscale_stop_epoch": 81}, 768, 36_565_260),
    "r101vd_6x": ({"backbone": "presnet101vd", "enc_hidden_dim": 384, "enc_dim_feedforward": 2048,
                   "lr_backbone": 1e-6}, 999, 76_527_756),
}  # fmt: skip

# The contract's "Existing flags, family defaults" and new flags (R50vd 6x), as --model rtdetrv2 must parse them.
CONTRACT_DEFAULTS = {
    "backbone": "presnet50vd", "return_interm_indices": [1, 2, 3], "hidden_dim": 256, "nheads": 8, "enc_layers": 1,
    "dec_layers": 6, "dim_feedforward": 1024, "dropout": 0.0, "num_queries": 300, "num_feature_levels": 3,
    "dec_n_points": 4, "dn_number": 100, "dn_label_noise_ratio": 0.5, "dn_box_noise_scale": 1.0,
    "focal_alpha": 0.25, "set_cost_class": 2, "set_cost_bbox": 5, "set_cost_giou": 2, "cls_loss_coef": 1,
    "bbox_loss_coef": 5, "giou_loss_coef": 2, "num_select": 300, "lr": 1e-4, "lr_backbone": 1e-5,
    "lr_backbone_names": ["backbone"], "weight_decay": 1e-4, "epochs": 72, "lr_drop": 1000, "clip_max_norm": 0.1,
    "batch_size": 4, "aux_loss": True, "freeze_at": 0, "freeze_norm": True, "enc_hidden_dim": 256,
    "enc_dim_feedforward": 1024, "enc_expansion": 1.0, "eval_idx": -1, "eval_spatial_size": [640, 640],
    "norm_weight_decay": 0.0, "bias_weight_decay": None, "ema_decay": 0.9999, "ema_warmups": 2000,
    "warmup_iters": 2000, "sync_bn": True, "aug_stop_epoch": 71,
    "multiscale_sizes": [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800],
    "multiscale_stop_epoch": 71, "remap_mscoco_category": True,
}  # fmt: skip


def tiny(*extra: str) -> argparse.Namespace:
    return get_args_parser().parse_args([*TINY_FLAGS, *RTDETR_TINY, *extra])


def test_table_row():
    family = models.FAMILIES["rtdetrv2"]
    assert (family.name, family.title) == ("rtdetrv2", "RT-DETRv2")
    assert family.default_num_classes == {"coco": 80, "synthetic": 6}
    assert list(family.hub_recipes) == [f"rtdetrv2_{n}" for n in ("r18vd", "r34vd", "r50vd", "r50vd_m", "r101vd")]
    for name, (flags, _, _) in RECIPES.items():
        assert family.hub_recipes["rtdetrv2_" + name.rsplit("_", 1)[0]] == flags
    assert family.keep_initial_heads


def test_family_defaults_are_the_contracts():
    args = get_args_parser().parse_args(["--model", "rtdetrv2"])
    assert {k: getattr(args, k) for k in CONTRACT_DEFAULTS} == CONTRACT_DEFAULTS
    assert args.amp == "off"  # published fp16 lives in the recipe configs (CPU runs cannot use it)


@pytest.mark.parametrize("model", ["detr", "deformable_detr", "dino"])
def test_other_families_keep_their_solver(model):
    args = get_args_parser().parse_args(["--model", model])
    assert (args.ema_decay, args.warmup_iters, args.sync_bn) == (0.0, 0, False)
    assert (args.norm_weight_decay, args.bias_weight_decay) == (None, None)
    with pytest.raises(ValueError, match="--freeze_at is a RT-DETRv2 flag: add --model rtdetrv2"):
        check_family_flags(get_args_parser().parse_args(["--model", model, "--freeze_at", "1"]), {"freeze_at"})


@pytest.mark.parametrize(
    ("flag", "message"),
    [("masks", "no mask head"), ("dilation", "no dilated"), ("pre_norm", "post-norm"),
     ("two_stage", "--two_stage is a .*rtdetrv2"), ("box_refine", "is a"),
     ("enc_n_points", "is a .*Deformable DETR"), ("backbone_stages", "is a")],
)  # fmt: skip
def test_flags_rtdetrv2_refuses(flag, message):
    args = tiny()
    with pytest.raises(ValueError, match=message):
        check_family_flags(args, {flag})


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_config_builds_the_published_layout(name):
    flags, keys, trainable = RECIPES[name]
    path = ROOT / "configs" / f"rtdetrv2_{name}_coco.yaml"
    args = parse_args_with_config(get_args_parser(), ["--config", str(path), "--backbone_weights", "none"])
    assert args.model == "rtdetrv2" and args.amp == "fp16"
    expected = {**CONTRACT_DEFAULTS, **flags}
    assert {k: getattr(args, k) for k in expected} == expected
    check_family_flags(args, set(), set(flags))
    with torch.device("meta"):  # shapes only: no weight initialisation
        model, criterion, post = models.build_model(args)
    state = model.state_dict()
    assert len(state) == keys
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert tuple(state["decoder.anchors"].shape) == (1, 8400, 4) and criterion.num_classes == 80
    assert models.family_of_state_dict(state) == "rtdetrv2"
    arch = models.FAMILIES["rtdetrv2"].architecture(state)
    depth = {"presnet18vd": 18, "presnet34vd": 34, "presnet50vd": 50, "presnet101vd": 101}[args.backbone]
    assert arch["backbone"] == f"presnet{depth}vd" and arch["freeze_norm"] == args.freeze_norm
    assert (arch["enc_hidden_dim"], arch["enc_dim_feedforward"], arch["enc_expansion"]) == (
        args.enc_hidden_dim, args.enc_dim_feedforward, args.enc_expansion,
    )  # fmt: skip
    assert (arch["dec_layers"], arch["num_classes"], arch["eval_spatial_size"]) == (args.dec_layers, 80, [640, 640])
    assert (arch["hidden_dim"], arch["nheads"], arch["dec_n_points"], arch["num_feature_levels"]) == (256, 8, 4, 3)


def test_tiny_state_dict_read_back_rebuilds_strictly():
    args = tiny("--num_classes", "7", "--dec_layers", "3")
    state = models.build_model(args)[0].state_dict()
    assert models.family_of_state_dict(state) == "rtdetrv2"
    arch = models.FAMILIES["rtdetrv2"].architecture(state)
    expected = {"num_classes": 7, "hidden_dim": 32, "nheads": 2, "enc_hidden_dim": 32, "enc_dim_feedforward": 64,
                "enc_expansion": 0.5, "enc_layers": 1, "dec_layers": 3, "dim_feedforward": 64,
                "backbone": "presnet18vd", "freeze_norm": False, "eval_spatial_size": [64, 64]}  # fmt: skip
    assert {k: arch[k] for k in expected} == expected
    # From the defaults of --model rtdetrv2 (R50vd, width 256), the architecture alone rebuilds the model.
    values = vars(get_args_parser().parse_args(["--model", "rtdetrv2", "--backbone_weights", "none"]))
    rebuilt = models.build_model(argparse.Namespace(**{**values, **{k: v for k, v in arch.items() if v is not None}}))
    rebuilt[0].load_state_dict(state, strict=True)
    # No saved anchors (built without an eval size): [] rebuilds it without them.
    state = models.build_model(tiny("--eval_spatial_size"))[0].state_dict()
    assert "decoder.anchors" not in state and models.FAMILIES["rtdetrv2"].architecture(state)["eval_spatial_size"] == []
    # --dn_number 0 (as published): no denoising embedding, and the state dict says so to the rebuild.
    family = models.FAMILIES["rtdetrv2"]
    state = models.build_model(tiny("--dn_number", "0"))[0].state_dict()
    assert not any("denoising_class_embed" in k for k in state)
    arch = family.architecture(state)
    assert arch["dn_number"] == 0 and family.architecture(rebuilt[0].state_dict())["dn_number"] is None
    values = {**vars(tiny()), **{k: v for k, v in arch.items() if v is not None}}
    models.build_model(argparse.Namespace(**values))[0].load_state_dict(state, strict=True)


def test_other_families_do_not_claim_rtdetrv2_keys():
    weight = torch.zeros(1)
    state = {"encoder.input_proj.0.conv.weight": weight, "decoder.enc_score_head.weight": weight}
    assert models.family_of_state_dict(state) == "rtdetrv2"
    assert models.family_of_state_dict({"class_embed.weight": weight}) == "detr"
    with pytest.raises(ValueError, match="not an RT-DETRv2 checkpoint"):
        models.FAMILIES["rtdetrv2"].architecture({"class_embed.weight": weight})


def test_settings_errors_are_one_line():
    with pytest.raises(ValueError, match="--backbone_weights imagenet: the published PResNet-vd"):
        models.build_model(tiny("--backbone_weights", "imagenet"))
    with pytest.raises(ValueError, match="--num_feature_levels 4"):
        models.build_model(tiny("--num_feature_levels", "4"))
    with pytest.raises(ValueError, match="--eval_spatial_size takes 2 values"):
        models.build_model(tiny("--eval_spatial_size", "64"))
    with pytest.raises(ValueError, match="unknown PResNet backbone 'resnet18'"):
        models.build_model(tiny("--backbone", "resnet18"))


HUB_TINY = {
    "backbone": "presnet18vd", "hidden_dim": 32, "enc_hidden_dim": 32, "nheads": 2, "dim_feedforward": 64,
    "enc_dim_feedforward": 64, "num_queries": 10, "dn_number": 4, "eval_spatial_size": [64, 64], "num_select": 10,
}  # fmt: skip


def test_hub_entries_and_published_checkpoint_layouts(tmp_path):
    import hubconf
    from run.model_loading import load_model

    names = sorted(n for n in dir(hubconf) if n.startswith("rtdetrv2_"))
    assert names == sorted(models.FAMILIES["rtdetrv2"].hub_recipes)
    with pytest.raises(ValueError, match="checkpoint='path/to/file.pth'"):
        hubconf.rtdetrv2_r50vd(pretrained=True)
    model = hubconf.rtdetrv2_r18vd(**HUB_TINY)
    state = model.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    # Published .pth layouts: {'ema': {'module', 'updates'}, 'model'} (EMA first) and {'model'} alone.
    torch.save({"ema": {"module": state, "updates": 5}, "model": other}, tmp_path / "ema.pth")
    torch.save({"model": other}, tmp_path / "model.pth")
    for name, expected in (("ema.pth", state), ("model.pth", other)):
        loaded = hubconf.rtdetrv2_r18vd(pretrained=True, checkpoint=str(tmp_path / name), **HUB_TINY).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
        rebuilt, post, args, _ = load_model(str(tmp_path / name))
        assert (args.model, args.backbone, args.hidden_dim, args.eval_spatial_size) == ("rtdetrv2", "presnet18vd", 32,
                                                                                        [64, 64])  # fmt: skip
        assert all(torch.equal(rebuilt.state_dict()[k], expected[k]) for k in expected), name
    # 300 queries (the default: not a weight) need 300 encoder tokens: 21 (128 / 32)^2 = 336.
    detections = post["bbox"](rebuilt(torch.rand(1, 3, 128, 128)), torch.tensor([[128, 128]]))[0]
    assert set(detections["labels"].tolist()) <= set(models.rtdetrv2.COCO_CATEGORY_IDS)  # remapped to COCO ids
    # Another class count: a fine-tuning start whose score heads keep the focal prior -log(99).
    tuned = hubconf.rtdetrv2_r18vd(pretrained=True, checkpoint=str(tmp_path / "ema.pth"), num_classes=5, **HUB_TINY)
    assert tuned.decoder.enc_score_head.weight.shape == (5, 32)
    assert torch.allclose(tuned.decoder.enc_score_head.bias, torch.full((5,), -4.59512), atol=1e-4)
    key = "encoder.input_proj.0.conv.weight"
    assert torch.equal(tuned.state_dict()[key], state[key])


RUN_FLAGS = (
    "--synthetic_train_size", "4", "--synthetic_val_size", "2", "--batch_size", "2", "--lr", "1e-3",
    "--no_progress", "--multiscale_sizes", "64", "96", "--warmup_iters", "3", "--ema_decay", "0.9",
    "--ema_warmups", "2", "--aug_stop_epoch", "1", "--eval_every", "5",
)  # fmt: skip
# (Evaluating only after the last epoch as tests/test_exact_resume.py does: an evaluation between epochs draws the
# validation loader's seed from the global generator after the checkpoint captured it.)


def _train(data: Path, out: Path, *extra: str) -> dict:
    import main as main_module

    args = tiny(*RUN_FLAGS, "--synthetic_dir", str(data), "--output_dir", str(out), *extra)
    args._explicit = frozenset({"device", *(e[2:] for e in extra if e.startswith("--"))})
    return main_module.main(args)


@pytest.mark.slow
def test_end_to_end_train_eval_resume_predict(tmp_path):
    """Two epochs on the generated data (6 categories, ids 1..12): EMA and warm-up checkpointed, exact resume,
    evaluation and prediction in the dataset's category ids."""
    from run.checkpoint import load_checkpoint
    from run.model_loading import load_model

    data = tmp_path / "data"
    stats = _train(data, tmp_path / "full", "--epochs", "2")
    assert len(stats["coco_eval_bbox"]) == 12
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    assert full["ema"]["updates"] == 4 and full["lr_warmup"]["step_count"] == 4
    assert full["model"]["decoder.enc_score_head.weight"].shape[0] == 6  # the 6 categories, labels 0..5
    assert len(full["optimizer"]["param_groups"]) == 4  # backbone / backbone BN (wd 0) / norms (wd 0) / rest
    assert [g["weight_decay"] for g in full["optimizer"]["param_groups"]] == [1e-4, 0.0, 0.0, 1e-4]
    assert any(not torch.equal(full["ema"]["module"][k], v) for k, v in full["model"].items())
    # One epoch, then --resume to two: every weight, the EMA and the warm-up equal the straight run's.
    _train(data, tmp_path / "half", "--epochs", "1")
    _train(data, tmp_path / "half", "--epochs", "2", "--resume", str(tmp_path / "half" / "checkpoint.pth"))
    resumed = load_checkpoint(tmp_path / "half" / "checkpoint.pth")
    for key in ("model",):
        assert all(torch.equal(resumed[key][k], v) for k, v in full[key].items()), key
    assert all(torch.equal(resumed["ema"]["module"][k], v) for k, v in full["ema"]["module"].items())
    assert resumed["lr_warmup"] == full["lr_warmup"] and resumed["ema"]["updates"] == 4
    # Prediction rebuilds the EMA weights and reports the generated dataset's category ids.
    model, post, args, _ = load_model(str(tmp_path / "full" / "checkpoint.pth"))
    key = "decoder.enc_score_head.bias"
    assert torch.equal(model.state_dict()[key], full["ema"]["module"][key])
    assert post["bbox"].category_ids.tolist() == [1, 3, 4, 7, 9, 12]
    import predict  # predict.py end to end: the family's 64 x 64 transform, the dataset's ids and names

    val = next(data.glob("*/val2017"))
    results = predict.main(["--checkpoint", str(tmp_path / "full" / "checkpoint.pth"), str(val), "--output_dir",
                            str(tmp_path / "pred"), "--threshold", "0", "--no_images", "--device", "cpu",
                            "--no_progress"])  # fmt: skip
    assert len(results) == 2 * 10 and {r["category_id"] for r in results} <= {1, 3, 4, 7, 9, 12}


def test_the_epoch_reaches_the_train_transform_and_the_collation():
    from datasets.rtdetr_transforms import MultiScaleCollate, RTDETRTrainTransform
    from run.loaders import begin_epoch, build_data_loaders

    class Data(torch.utils.data.Dataset):
        transforms = RTDETRTrainTransform(aug_stop_epoch=3)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> int:
            return index

    collate = MultiScaleCollate([64], stop_epoch=2)
    args = tiny("--batch_size", "2")
    loader, _ = build_data_loaders(args, Data(), Data(), torch.device("cpu"), train_collate=collate)
    assert loader.collate_fn is collate and not loader.persistent_workers
    for epoch, augmenting, multiscale in ((0, True, True), (2, True, False), (3, False, False)):
        begin_epoch(loader, epoch, seed=0)
        assert (Data.transforms.augmenting, collate.active) == (augmenting, multiscale), epoch


def test_torch_export_and_onnx_keep_the_eval_size_with_a_dynamic_batch(tmp_path):
    """Parity of both exports with the eager model at the fixed (eval anchor) size, batch 1..3; another size is
    refused in one line."""
    from tools.export import compare_with_eager, example_inputs, export_program
    from tools.export_onnx import compare_with_onnxruntime, export_onnx

    model = models.build_model(tiny())[0].eval()
    assert model.fixed_input_size == (64, 64)
    with pytest.raises(ValueError, match="exports at 64x64 only"):
        export_program(model, 96, 96)
    program = export_program(model, 64, 64, batch_size=2)
    for batch in (1, 3):
        diffs = compare_with_eager(model, program, *example_inputs(batch, 64, 64))
        assert max(diffs.values()) < 1e-5, diffs
    path = export_onnx(model, tmp_path / "rtdetr.onnx", 64, 64, batch_size=1, dynamic=True)
    for batch in (1, 2):
        diffs = compare_with_onnxruntime(model, path, torch.randn(batch, 3, 64, 64))
        assert max(diffs.values()) < 1e-4, diffs


def test_exports_at_the_published_640_size_match_eager_with_a_dynamic_batch(tmp_path):
    """The published eval size: anchors for 640 x 640 (8,400 tokens); torch.export (traced at batch 2) and the ONNX
    export (of the prepared inference copy, dynamic batch) both give the eager model's outputs at batch 1..3."""
    from tools.export import compare_with_eager, example_inputs, export_program
    from tools.export_onnx import compare_with_onnxruntime, export_onnx

    model = models.build_model(tiny("--eval_spatial_size", "640", "640"))[0].eval()
    assert model.fixed_input_size == (640, 640)
    program = export_program(model, 640, 640, batch_size=2)
    for batch in (1, 3):
        diffs = compare_with_eager(model, program, *example_inputs(batch, 640, 640))
        assert max(diffs.values()) < 1e-5, (batch, diffs)
    path = export_onnx(model, tmp_path / "rtdetr640.onnx", 640, 640, batch_size=1, dynamic=True)
    for batch in (1, 2):
        diffs = compare_with_onnxruntime(model, path, torch.randn(batch, 3, 640, 640))
        assert max(diffs.values()) < 1e-4, (batch, diffs)


def test_class_numbering_follows_remap_mscoco_category(tmp_path):
    """Remapped: labels are indices of the generated dataset's 6 category ids (1, 3, 4, 7, 9, 12); without the
    remap the labels are the ids and the classifier has max id + 1 = 13 classes."""
    import datasets
    from cli.config import UsageError
    from run.recipe import class_numbering

    family = models.FAMILIES["rtdetrv2"]
    flags = ("--dataset_file", "synthetic", "--synthetic_dir", str(tmp_path), "--synthetic_train_size", "2",
             "--synthetic_val_size", "1")  # fmt: skip
    for extra, expected in (((), ([1, 3, 4, 7, 9, 12], 6)), (("--no_remap_mscoco_category",), (None, 13))):
        args = tiny(*flags, *extra)
        assert class_numbering(family, family.make_settings(vars(args)), datasets.data_settings(args), None) == expected
    args = tiny(*flags)
    assert class_numbering(family, family.make_settings(vars(args)), datasets.data_settings(args), 8)[1] == 8
    with pytest.raises(UsageError, match="--num_classes 5 is fewer than the dataset's 6 categories"):
        class_numbering(family, family.make_settings(vars(args)), datasets.data_settings(args), 5)


def test_postprocessor_reports_category_ids_and_numbers_extra_classes_after_them():
    post = models.rtdetrv2.RTDETRPostProcessor(num_select=4)
    post.set_category_ids([2, 5], num_classes=4)  # --num_classes 4 for 2 categories
    assert post.category_ids.tolist() == [2, 5, 6, 7]
    logits = torch.full((1, 1, 4), -9.0)
    logits[0, 0] = torch.tensor([0.0, 3.0, 1.0, 2.0])  # labels by score: 1, 3, 2, 0
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    (result,) = post(outputs, torch.tensor([[10, 20]]))
    assert result["labels"].tolist() == [5, 7, 6, 2]
    assert result["boxes"][0].tolist() == pytest.approx([8.0, 4.0, 12.0, 6.0])
