"""tools/convert_hf.py: HF transformers DETR / Deformable DETR folders <-> this project's checkpoints.

Tiny random models on both sides (timm ResNet-18 backbone without pretrained weights, hidden 32, 1-2 layers): the
converted model must give the other implementation's outputs on the same padded images (1e-4), in both directions.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from helpers import box_targets, parse_tiny_args  # noqa: E402

from interop.hf_detr import Arch, MappingError, hf_to_project_state, project_to_hf_state  # noqa: E402
from interop.hf_folder import checkpoint_to_hf_folder, class_names_from_id2label, hf_folder_to_checkpoint  # noqa: E402
from models import build_model  # noqa: E402
from run.checkpoint import load_checkpoint  # noqa: E402
from tools.convert_hf import main as convert_main  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

TOL = 1e-4
TINY_HF = dict(
    use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, d_model=32, encoder_layers=1,
    decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    num_queries=6, dropout=0.0,
)  # fmt: skip
DEFORMABLE_VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
}


def perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Make every tensor distinct and non-trivial (zero biases, identity BN and equal heads hide mapping errors)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.add_(torch.randn_like(tensor) * scale)
    return model.eval()


def images() -> list[torch.Tensor]:
    """The same two images of different sizes at every call: the batch is padded, so masks matter."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(3, 96, 128, generator=generator), torch.randn(3, 80, 100, generator=generator)]


def run_ours(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(nested_tensor_from_tensor_list(images()))


def run_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    batch = nested_tensor_from_tensor_list(images())
    with torch.no_grad():
        out = model(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long())
    found = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    if getattr(out, "pred_masks", None) is not None:
        found["pred_masks"] = out.pred_masks
    return found


def assert_same_outputs(ours: dict, hf: dict) -> None:
    for name, expected in hf.items():
        torch.testing.assert_close(ours[name], expected, atol=TOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def build_ours(checkpoint: dict) -> torch.nn.Module:
    args = argparse.Namespace(**checkpoint["args"])
    args.device = "cpu"
    model, _, _ = build_model(args)
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.eval()


def hf_detr(masks: bool = False, **overrides) -> torch.nn.Module:
    config = transformers.DetrConfig(**{**TINY_HF, "num_labels": 5, **overrides})
    model_class = transformers.DetrForSegmentation if masks else transformers.DetrForObjectDetection
    return perturb_(model_class(config))


def hf_deformable(**overrides) -> torch.nn.Module:
    settings = {**TINY_HF, "num_labels": 5, "two_stage_num_proposals": 6, **overrides}
    return perturb_(transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**settings)))


def to_project(hf_model: torch.nn.Module, tmp_path) -> dict:
    hf_model.save_pretrained(tmp_path / "hf")
    return hf_folder_to_checkpoint(tmp_path / "hf")


# ------------------------------------------------------------------------------------------ HF -> ours


def test_detr_hf_to_project_same_outputs(tmp_path):
    hf_model = hf_detr()
    checkpoint = to_project(hf_model, tmp_path)
    assert checkpoint["args"]["model"] == "detr" and checkpoint["args"]["num_classes"] == 5
    assert checkpoint["model"]["class_embed.weight"].shape == (6, 32)  # 5 labels + "no object", like HF's
    assert_same_outputs(run_ours(build_ours(checkpoint)), run_hf(hf_model))


def test_detr_learned_position_and_dilation(tmp_path):
    hf_model = hf_detr(position_embedding_type="learned", dilation=True)
    checkpoint = to_project(hf_model, tmp_path)
    assert checkpoint["args"]["position_embedding"] == "learned" and checkpoint["args"]["dilation"]
    assert_same_outputs(run_ours(build_ours(checkpoint)), run_hf(hf_model))


def test_detr_panoptic_hf_to_project_same_outputs(tmp_path):
    # HF's mask head needs d_model + heads divisible by 8.
    hf_model = hf_detr(masks=True, encoder_attention_heads=8, decoder_attention_heads=8)
    checkpoint = to_project(hf_model, tmp_path)
    assert checkpoint["args"]["masks"] and "mask_head.lay1.weight" in checkpoint["model"]
    ours, hf = run_ours(build_ours(checkpoint)), run_hf(hf_model)
    assert set(hf) == {"pred_logits", "pred_boxes", "pred_masks"}
    assert_same_outputs(ours, hf)


@pytest.mark.parametrize("variant", DEFORMABLE_VARIANTS)
def test_deformable_hf_to_project_same_outputs(tmp_path, variant):
    hf_model = hf_deformable(**DEFORMABLE_VARIANTS[variant])
    checkpoint = to_project(hf_model, tmp_path)
    args = checkpoint["args"]
    assert args["model"] == "deformable_detr" and args["num_queries"] == 6
    assert args["with_box_refine"] == hf_model.config.with_box_refine and args["two_stage"] == hf_model.config.two_stage
    assert args["num_feature_levels"] == hf_model.config.num_feature_levels
    assert_same_outputs(run_ours(build_ours(checkpoint)), run_hf(hf_model))


@pytest.mark.xfail(
    strict=True,
    reason="HF's DetrDecoder with auxiliary_loss=True passes the final-LayerNorm'ed "
    "states on to the next decoder layer; the published DETR (ours) normalises only the outputs",
)
def test_detr_hf_auxiliary_loss_changes_hf_outputs(tmp_path):
    hf_model = hf_detr(auxiliary_loss=True)
    assert_same_outputs(run_ours(build_ours(to_project(hf_model, tmp_path))), run_hf(hf_model))


def test_predict_loads_converted_checkpoints(tmp_path):
    from run.model_loading import load_model

    for name, hf_model in {"detr": hf_detr(), "two_stage": hf_deformable(with_box_refine=True, two_stage=True)}.items():
        hf_model.save_pretrained(tmp_path / name)
        convert_main(["to-project", str(tmp_path / name), str(tmp_path / f"{name}.pth")])
        model, _, args, _ = load_model(str(tmp_path / f"{name}.pth"))
        assert args.num_queries == 6
        assert_same_outputs(run_ours(model), run_hf(hf_model))


def test_transformers_4_config_json():
    """Hub configs written by transformers 4.x: timm backbone named at the top level, no backbone_config."""
    from interop.hf_folder import hf_config_flags

    config = {"model_type": "detr", "use_timm_backbone": True, "backbone": "resnet101", "backbone_config": None,
              "dilation": True, "d_model": 256, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
              "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "encoder_layers": 6, "decoder_layers": 6,
              "num_queries": 100, "id2label": {str(i): "x" for i in range(91)}}  # fmt: skip
    arch, flags = hf_config_flags(config, masks=False)
    assert arch == Arch("detr", 6, 6)
    text = " ".join(flags)
    assert "--backbone resnet101" in text and "--dilation" in text and "--num_classes 91" in text
    with pytest.raises(MappingError, match="only the timm ResNet layout"):
        hf_config_flags({**config, "backbone_config": {"model_type": "resnet"}}, masks=False)
    with pytest.raises(MappingError, match="encoder_ffn_dim=2048 but decoder_ffn_dim=1024"):
        hf_config_flags({**config, "decoder_ffn_dim": 1024}, masks=False)


# ------------------------------------------------------------------------------------------ ours -> HF


def our_checkpoint(*flags: str, class_names: dict | None = None) -> dict:
    args = parse_tiny_args("--num_classes", "5", "--num_queries", "6", *flags)
    model, _, _ = build_model(args)
    checkpoint = {"model": perturb_(model).state_dict(), "args": vars(args)}
    if class_names:
        checkpoint["class_names"] = class_names
    return checkpoint


def from_pretrained(folder) -> torch.nn.Module:
    name = json.loads((folder / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, name).from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


OUR_VARIANTS = {
    "detr": ("--model", "detr"),
    "detr_panoptic": ("--model", "detr", "--masks", "--nheads", "8"),
    "detr_dc5_learned_position": ("--model", "detr", "--dilation", "--position_embedding", "learned"),
    "deformable": ("--model", "deformable_detr"),
    "deformable_box_refine": ("--model", "deformable_detr", "--with_box_refine"),
    "deformable_two_stage": ("--model", "deformable_detr", "--with_box_refine", "--two_stage"),
    "deformable_single_scale": ("--model", "deformable_detr", "--num_feature_levels", "1"),
}


@pytest.mark.parametrize("variant", OUR_VARIANTS)
def test_project_to_hf_same_outputs(tmp_path, variant):
    checkpoint = our_checkpoint(*OUR_VARIANTS[variant])
    checkpoint_to_hf_folder(checkpoint, tmp_path / "hf")
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    hf_model = from_pretrained(tmp_path / "hf")
    assert_same_outputs(run_ours(build_ours(checkpoint)), run_hf(hf_model))


def test_round_trip_keeps_every_tensor_and_class_names(tmp_path):
    names = {1: "cat", 3: "dog"}
    checkpoint = our_checkpoint("--model", "deformable_detr", "--with_box_refine", class_names=names)
    checkpoint_to_hf_folder(checkpoint, tmp_path / "hf")
    id2label = json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]
    assert id2label == {"0": "N/A", "1": "cat", "2": "N/A", "3": "dog", "4": "N/A"}
    back = hf_folder_to_checkpoint(tmp_path / "hf")
    assert back["class_names"] == names
    assert back["model"].keys() == checkpoint["model"].keys()
    for key, value in checkpoint["model"].items():
        assert torch.equal(back["model"][key], value), key


def test_unnamed_classes_get_hf_placeholders_and_come_back_unnamed(tmp_path):
    checkpoint_to_hf_folder(our_checkpoint("--model", "detr"), tmp_path / "hf")
    id2label = json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]
    assert id2label == {str(i): f"LABEL_{i}" for i in range(5)}
    assert "class_names" not in hf_folder_to_checkpoint(tmp_path / "hf")
    assert class_names_from_id2label({"0": "N/A", "2": "bus", "1": "LABEL_1"}) == {2: "bus"}


# ------------------------------------------------------------------------------------------ the mapping itself


def test_fused_attention_rows_are_q_k_v():
    arch = Arch("detr", enc_layers=1, dec_layers=1)
    checkpoint = our_checkpoint("--model", "detr", "--enc_layers", "1", "--dec_layers", "1")
    hf = project_to_hf_state(checkpoint["model"], arch)
    fused = checkpoint["model"]["transformer.encoder.layers.0.self_attn.in_proj_weight"]
    for i, name in enumerate("qkv"):  # hand-split: rows [i * 32, (i + 1) * 32)
        assert torch.equal(hf[f"model.encoder.layers.0.self_attn.{name}_proj.weight"], fused[32 * i : 32 * (i + 1)])
    assert "model.backbone.conv_encoder.model.layer4.1.bn2.running_var" in hf
    assert torch.equal(hf_to_project_state(hf, arch)["transformer.encoder.layers.0.self_attn.in_proj_weight"], fused)


def test_leftover_and_missing_tensors_are_named():
    arch = Arch("detr", enc_layers=1, dec_layers=1)
    state = our_checkpoint("--model", "detr", "--enc_layers", "1", "--dec_layers", "1")["model"]
    hf = project_to_hf_state(state, arch)
    with pytest.raises(MappingError, match=r"not mapped .*model\.encoder\.layers\.7\.extra"):
        hf_to_project_state({**hf, "model.encoder.layers.7.extra": torch.zeros(1)}, arch)
    hf.pop("model.decoder.layers.0.encoder_attn.k_proj.bias")
    with pytest.raises(MappingError, match=r"lack model\.decoder\.layers\.0\.encoder_attn\.k_proj\.bias"):
        hf_to_project_state(hf, arch)
    with pytest.raises(MappingError, match=r"no HF counterpart: extra\.weight"):
        project_to_hf_state({**state, "extra.weight": torch.zeros(1)}, arch)


def test_unconvertible_checkpoints_fail_in_one_line(tmp_path):
    with pytest.raises(MappingError, match="pre_norm"):
        checkpoint_to_hf_folder(our_checkpoint("--model", "detr", "--pre_norm"), tmp_path / "a")
    with pytest.raises(MappingError, match="--spatial_prior"):
        checkpoint_to_hf_folder(our_checkpoint("--model", "detr", "--spatial_prior", "gaussian"), tmp_path / "b")
    with pytest.raises(MappingError, match="HF transformers has no such model"):
        checkpoint_to_hf_folder(our_checkpoint(*FAMILY_DINO), tmp_path / "c")


FAMILY_DINO = ("--model", "dino", "--dn_number", "4", "--lr_backbone", "1e-5")


def test_cli_both_ways(tmp_path, capsys):
    hf_model = hf_detr()
    hf_model.save_pretrained(tmp_path / "hf")
    convert_main(["to-project", str(tmp_path / "hf"), str(tmp_path / "ours.pth"), "--check"])
    checkpoint = load_checkpoint(tmp_path / "ours.pth")
    assert_same_outputs(run_ours(build_ours(checkpoint)), run_hf(hf_model))
    convert_main(["from-project", str(tmp_path / "ours.pth"), str(tmp_path / "back"), "--check"])
    assert_same_outputs(run_hf(from_pretrained(tmp_path / "back")), run_hf(hf_model))
    with pytest.raises(SystemExit, match="no config.json"):
        convert_main(["to-project", str(tmp_path), str(tmp_path / "x.pth")])


def test_deformable_shared_heads_must_agree_and_tied_heads_are_filled():
    arch = Arch("deformable_detr", enc_layers=1, dec_layers=2, num_feature_levels=4)
    state = our_checkpoint("--model", "deformable_detr")["model"]
    hf = project_to_hf_state(state, arch)
    # transformers 5.x saves one copy of heads it ties: the others come back from class_embed.0 / bbox_embed.0
    trimmed = {k: v for k, v in hf.items() if not k.startswith(("class_embed.1.", "bbox_embed.1."))}
    assert torch.equal(hf_to_project_state(trimmed, arch)["class_embed.1.weight"], state["class_embed.0.weight"])
    hf["class_embed.1.bias"] = hf["class_embed.1.bias"] + 1
    with pytest.raises(MappingError, match="class_embed.1.bias differs from class_embed.0.bias"):
        hf_to_project_state(hf, arch)


def test_finetune_takes_converted_checkpoint(tmp_path):
    from run.finetune import load_for_finetuning

    hf_deformable(with_box_refine=True).save_pretrained(tmp_path / "hf")
    convert_main(["to-project", str(tmp_path / "hf"), str(tmp_path / "ours.pth")])
    flags = ["--model", "deformable_detr", "--with_box_refine", "--num_queries", "6", "--num_classes", "3"]
    model, _, _ = build_model(parse_tiny_args(*flags))
    reset = load_for_finetuning(model, str(tmp_path / "ours.pth"), verbose=False)
    assert reset and all("class_embed" in name for name in reset)  # only the 5 -> 3 class heads start afresh
    converted = load_checkpoint(tmp_path / "ours.pth")["model"]
    assert torch.equal(model.state_dict()["transformer.level_embed"], converted["transformer.level_embed"])


# ------------------------------------------------------------------------------------------ training losses

# name -> (HF model factory, HF config overrides). HF's matcher class cost defaults to 1; the published Deformable
# DETR uses 2 (our converted flags keep HF's value, so both sides match with the same costs).
LOSS_VARIANTS = {
    # HF's DETR with auxiliary_loss=True feeds LayerNorm'ed states to the next layer (see the xfail above): off.
    "detr": (hf_detr, {"auxiliary_loss": False}),
    "deformable": (hf_deformable, {"auxiliary_loss": True, "class_cost": 2}),
    "deformable_box_refine": (hf_deformable, {"auxiliary_loss": True, "class_cost": 2, "with_box_refine": True}),
    "deformable_two_stage": (
        hf_deformable,
        {"auxiliary_loss": True, "class_cost": 2, "with_box_refine": True, "two_stage": True},
    ),
}


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_training_losses_equal_hf(tmp_path, variant):
    """The unweighted loss terms of a training step equal HF's independent loss on the same weights, padded images
    and targets: DETR's softmax cross-entropy (no-object weight 0.1) and cardinality; Deformable DETR's sigmoid focal
    loss (alpha 0.25, gamma 2, x queries / boxes) with focal-cost matching; L1 and GIoU; every auxiliary decoder
    layer. Not compared: Deformable DETR's cardinality_error (logged only; HF counts sigmoid > 0.5, the published
    code and this one count argmax != last class), class_error (ours only) and the two-stage encoder terms (HF has
    none)."""
    factory, overrides = LOSS_VARIANTS[variant]
    hf_model = factory(**overrides)
    checkpoint = to_project(hf_model, tmp_path)
    args = argparse.Namespace(**checkpoint["args"])
    args.device = "cpu"
    ours, criterion, _ = build_model(args)
    ours.load_state_dict(checkpoint["model"], strict=True)
    ours.train(), hf_model.train()  # dropout is 0 on both sides
    targets = box_targets()  # 3 and 2 boxes of 5 classes
    batch = nested_tensor_from_tensor_list(images())
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    with torch.no_grad():
        outputs = ours(batch)
        ours_losses = criterion(outputs, targets)
        hf_losses = hf_model(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long(), labels=hf_labels).loss_dict
    focal = variant.startswith("deformable")
    compared = {k for k in hf_losses if not (focal and k.startswith("cardinality_error"))}
    layers = hf_model.config.decoder_layers if hf_model.config.auxiliary_loss else 1
    assert len(compared) == (3 if focal else 4) * layers
    for key in sorted(compared):
        torch.testing.assert_close(
            ours_losses[key], hf_losses[key], atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
    assert all(ours_losses[k] > 0 for k in compared if k.startswith("loss_"))
    if focal:  # the published rule, recomputed: queries whose arg-max logit is not the last class
        counts = (outputs["pred_logits"].argmax(-1) != outputs["pred_logits"].shape[-1] - 1).sum(1).float()
        expected = (counts - torch.tensor([float(len(t["labels"])) for t in targets])).abs().mean()
        torch.testing.assert_close(ours_losses["cardinality_error"], expected)
