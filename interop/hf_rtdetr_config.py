"""HF ``RTDetrV2Config`` (with its ``RTDetrResNetConfig`` backbone) <-> this project's ``--model rtdetrv2`` flags,
and the RT-DETRv2 halves of ``interop.hf_folder`` (HF folder -> checkpoint, checkpoint -> HF folder).

Labels: HF's id i is our label i. An 80-class model keeps ``--remap_mscoco_category`` (published): label i is
reported as COCO category ``COCO_CATEGORY_IDS[i]``, so the class names are keyed by those ids; any other class
count keys them by i (or by the checkpoint's stored category ids, as this project's runs save them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interop.hf_detr import MappingError
from interop.hf_rtdetr import ANCHOR_KEYS, eval_anchors, hf_to_project_state, project_to_hf_state
from models.presnet import PRESNET_DEPTHS
from models.rtdetrv2 import COCO_CATEGORY_IDS

__all__ = ["category_ids", "checkpoint_to_hf_files", "hf_config_kwargs", "hf_folder_to_rtdetr", "hf_rtdetr_flags"]

log = logging.getLogger("detr")
_WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}
_DEFAULT_SIZE = (640, 640)  # the published eval size (and HF's image processor default)
# HF config values this project's RT-DETRv2 has fixed (published): name -> (value, what differs otherwise).
_FIXED = {
    "feat_strides": ([8, 16, 32], "strides"), "encode_proj_layers": ([2], "AIFI levels"),
    "num_feature_levels": (3, "levels"), "decoder_n_levels": (3, "levels"),
    "positional_encoding_temperature": (10000, "position table"), "encoder_activation_function": ("gelu", "AIFI"),
    "activation_function": ("silu", "CCFF"), "decoder_activation_function": ("relu", "decoder FFN"),
    "normalize_before": (False, "post-norm AIFI"), "learn_initial_query": (False, "queries from the encoder"),
    "with_box_refine": (True, "box refinement"), "decoder_method": ("default", "bilinear sampling"),
    "decoder_offset_scale": (0.5, "offset scale"), "layer_norm_eps": (1e-5, "LayerNorm eps"),
    "batch_norm_eps": (1e-5, "BatchNorm eps"),
}  # fmt: skip
_FIXED_BACKBONE = {
    "embedding_size": (64, "stem width"), "hidden_act": ("relu", "activation"), "num_channels": (3, "RGB input"),
    "downsample_in_first_stage": (False, "stride-1 first stage"), "downsample_in_bottleneck": (False, "variant d"),
}  # fmt: skip


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, tuple[Any, str]], where: str) -> None:
    for name, (value, what) in fixed.items():
        got = config.get(name, value)
        same = math.isclose(got, value) if isinstance(value, float) else list(got) == value if isinstance(
            value, list) else got == value  # fmt: skip
        if not same:
            raise MappingError(f"HF {where}{name}={got!r}: this project's RT-DETRv2 has {value!r} ({what})")


def _backbone(config: Mapping[str, Any]) -> tuple[str, list[int]]:
    """(our --backbone, the encoder's input channels) of an HF RT-DETRv2 config."""
    sub = config.get("backbone_config") or {}
    if sub.get("model_type") != "rt_detr_resnet":
        raise MappingError(f"HF backbone '{sub.get('model_type')}': only RT-DETR's ResNet-vd (rt_detr_resnet) converts")
    _check_fixed(sub, _FIXED_BACKBONE, "backbone_config.")
    kind, depths = sub.get("layer_type", "bottleneck"), tuple(sub.get("depths", ()))
    depth = next((d for d, blocks in PRESNET_DEPTHS.items() if blocks == depths and (d >= 50) == (kind != "basic")),
                 None)  # fmt: skip
    if depth is None or list(sub.get("hidden_sizes", ())) != _WIDTHS.get(kind):
        raise MappingError(f"HF ResNet-vd {kind} depths {list(depths)} widths {sub.get('hidden_sizes')}: "
                           "convertible ones are the published 18/34/50/101")  # fmt: skip
    if list(sub.get("out_indices") or []) != [2, 3, 4]:
        raise MappingError(f"HF backbone out_indices {sub.get('out_indices')}: RT-DETRv2 takes stages 2 3 4")
    return f"presnet{depth}vd", _WIDTHS[kind][1:]


def _same(config: Mapping[str, Any], a: str, b: str) -> Any:
    if config.get(a) != config.get(b):
        raise MappingError(f"HF {a}={config.get(a)} but {b}={config.get(b)}: this project uses one value for both")
    return config[a]


def _eval_size(config: Mapping[str, Any], processor: Mapping[str, Any]) -> tuple[int, int]:
    """The size whose anchors our model keeps: HF's anchor_image_size, else the image processor's resize."""
    anchor = config.get("anchor_image_size")
    if anchor:
        return int(anchor[0]), int(anchor[1])
    size = processor.get("size") or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return _DEFAULT_SIZE


def hf_rtdetr_flags(config: Mapping[str, Any], processor: Mapping[str, Any] | None = None) -> list[str]:
    """Our command-line flags (``--model rtdetrv2`` first) of an HF RT-DETRv2 config.json (and
    preprocessor_config.json, whose resize becomes ``--eval_spatial_size``).

    Raises:
        MappingError: an HF option this project's RT-DETRv2 does not have (one line naming it).
    """
    if config.get("model_type") != "rt_detr_v2":
        raise MappingError(f"HF model_type '{config.get('model_type')}': this converter takes rt_detr_v2")
    _check_fixed(config, _FIXED, "")
    backbone, channels = _backbone(config)
    if list(config.get("encoder_in_channels", channels)) != channels:
        raise MappingError(f"HF encoder_in_channels {config['encoder_in_channels']}: {backbone} gives {channels}")
    hidden = int(config.get("encoder_hidden_dim", 256))
    if list(config.get("decoder_in_channels", [hidden] * 3)) != [hidden] * 3:
        raise MappingError(f"HF decoder_in_channels {config['decoder_in_channels']}: the encoder gives {[hidden] * 3}")
    if config.get("eval_size"):
        log.warning("HF config has eval_size=%s: HF's AIFI then runs without its position table in eval; the "
                    "converted model computes the published RT-DETRv2 (with it)", config["eval_size"])  # fmt: skip
    frozen = bool(config.get("freeze_backbone_batch_norms", True))
    height, width = _eval_size(config, processor or {})
    queries = str(config.get("num_queries", 300))
    return [
        "--model", "rtdetrv2", "--backbone", backbone, "--backbone_weights", "none",
        "--freeze_at", "0" if frozen else "-1", "--freeze_norm" if frozen else "--no_freeze_norm",
        "--enc_hidden_dim", str(hidden), "--enc_dim_feedforward", str(config.get("encoder_ffn_dim", 1024)),
        "--enc_expansion", str(float(config.get("hidden_expansion", 1.0))),
        "--enc_layers", str(config.get("encoder_layers", 1)), "--hidden_dim", str(config.get("d_model", 256)),
        "--nheads", str(_same(config, "encoder_attention_heads", "decoder_attention_heads")),
        "--dec_layers", str(config.get("decoder_layers", 6)),
        "--dim_feedforward", str(config.get("decoder_ffn_dim", 1024)),
        "--dropout", str(config.get("dropout", 0.0)), "--num_queries", queries, "--num_select", queries,
        "--dec_n_points", str(config.get("decoder_n_points", 4)), "--dn_number", str(config.get("num_denoising", 100)),
        "--dn_label_noise_ratio", str(config.get("label_noise_ratio", 0.5)),
        "--dn_box_noise_scale", str(config.get("box_noise_scale", 1.0)), "--num_classes", str(len(config["id2label"])),
        "--eval_spatial_size", str(height), str(width), "--eval_idx", "-1",
        "--focal_alpha", str(config.get("matcher_alpha", 0.25)),
        "--set_cost_class", str(config.get("matcher_class_cost", 2.0)),
        "--set_cost_bbox", str(config.get("matcher_bbox_cost", 5.0)),
        "--set_cost_giou", str(config.get("matcher_giou_cost", 2.0)),
        "--cls_loss_coef", str(config.get("weight_loss_vfl", 1.0)),
        "--bbox_loss_coef", str(config.get("weight_loss_bbox", 5.0)),
        "--giou_loss_coef", str(config.get("weight_loss_giou", 2.0)),
    ]  # fmt: skip


def category_ids(num_classes: int, remap: bool, stored: Sequence[int] | None = None) -> list[int]:
    """The category id reported for each label 0..K-1: the stored ids (K of them), COCO's 80 ids for an 80-class
    model with ``--remap_mscoco_category``, else the labels themselves."""
    if stored is not None and len(stored) == num_classes:
        return list(stored)
    if remap and num_classes == len(COCO_CATEGORY_IDS):
        return list(COCO_CATEGORY_IDS)
    return list(range(num_classes))


def hf_folder_to_rtdetr(folder: str | Path, config: Mapping[str, Any], hf_state: Mapping[str, Tensor],
                        names: Mapping[int, str]) -> dict[str, Any]:  # fmt: skip
    """An HF RT-DETRv2 folder's config and weights as our checkpoint dict; ``names``: HF id -> class name."""
    from cli.arguments import get_args_parser

    processor_file = Path(folder) / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text(encoding="utf-8")) if processor_file.is_file() else {}
    args = get_args_parser().parse_args(hf_rtdetr_flags(config, processor))
    checkpoint: dict[str, Any] = {
        "model": hf_to_project_state(hf_state, args.eval_spatial_size),
        "args": {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")},
        "converted_from": f"HF {config.get('model_type')} ({', '.join(config.get('architectures') or [])})",
    }
    ids = category_ids(args.num_classes, args.remap_mscoco_category)
    if names:
        checkpoint["class_names"] = {ids[i]: name for i, name in names.items() if i < len(ids)}
    return checkpoint


# ------------------------------------------------------------------------------------------ ours -> HF


def hf_config_kwargs(args: argparse.Namespace, id2label: Mapping[int, str]) -> dict[str, Any]:
    """Keyword arguments of ``RTDetrV2Config`` for our RT-DETRv2 flags (``backbone_config`` a plain dict).

    Raises:
        MappingError: a flag HF's model has no equivalent of.
    """
    if args.eval_idx not in (-1, args.dec_layers - 1):
        raise MappingError(f"checkpoint with --eval_idx {args.eval_idx}: HF's RTDetrV2 returns the last decoder "
                           f"layer's boxes (of {args.dec_layers}); cannot convert")  # fmt: skip
    depth = int(str(args.backbone).removeprefix("presnet").removesuffix("vd"))
    kind = "bottleneck" if depth >= 50 else "basic"
    hidden = int(args.enc_hidden_dim)
    backbone = dict(model_type="rt_detr_resnet", layer_type=kind, depths=list(PRESNET_DEPTHS[depth]),
                    hidden_sizes=_WIDTHS[kind], embedding_size=64, hidden_act="relu",
                    out_indices=[2, 3, 4])  # fmt: skip
    return dict(
        backbone_config=backbone, freeze_backbone_batch_norms=bool(args.freeze_norm),
        encoder_hidden_dim=hidden, encoder_in_channels=_WIDTHS[kind][1:], encoder_layers=int(args.enc_layers),
        encoder_ffn_dim=int(args.enc_dim_feedforward), encoder_attention_heads=int(args.nheads),
        hidden_expansion=float(args.enc_expansion), d_model=int(args.hidden_dim), num_queries=int(args.num_queries),
        decoder_in_channels=[hidden] * 3, decoder_ffn_dim=int(args.dim_feedforward),
        decoder_layers=int(args.dec_layers), decoder_attention_heads=int(args.nheads),
        decoder_n_points=int(args.dec_n_points), num_denoising=int(args.dn_number),
        label_noise_ratio=float(args.dn_label_noise_ratio), box_noise_scale=float(args.dn_box_noise_scale),
        dropout=float(args.dropout),
        # eval_size set would make HF's AIFI skip its position table in eval; None keeps the published model.
        eval_size=None, anchor_image_size=None,
        matcher_alpha=float(args.focal_alpha), matcher_class_cost=float(args.set_cost_class),
        matcher_bbox_cost=float(args.set_cost_bbox), matcher_giou_cost=float(args.set_cost_giou),
        weight_loss_vfl=float(args.cls_loss_coef), weight_loss_bbox=float(args.bbox_loss_coef),
        weight_loss_giou=float(args.giou_loss_coef), id2label=dict(id2label),
        label2id={n: i for i, n in id2label.items()}, architectures=["RTDetrV2ForObjectDetection"],
    )  # fmt: skip


def checkpoint_to_hf_files(checkpoint: Mapping[str, Any], folder: Path) -> dict[str, Tensor]:
    """Write config.json and preprocessor_config.json of one of our RT-DETRv2 checkpoints into ``folder``;
    returns the HF weights to save beside them."""
    import transformers

    from run.checkpoint import inference_weights
    from run.model_loading import model_args_from_checkpoint, stored_category_ids
    from util.class_names import COCO_CLASSES, resolve_class_names

    state = inference_weights(checkpoint)
    args = model_args_from_checkpoint(checkpoint)
    if args.eval_spatial_size and ANCHOR_KEYS[0] in state:
        # HF recomputes anchors per input: saved ones that are not those of the eval size would change the outputs.
        expected = eval_anchors(args.eval_spatial_size)
        if not all(torch.equal(state[k], expected[k]) for k in ANCHOR_KEYS):
            raise MappingError(f"checkpoint's {ANCHOR_KEYS[0]} are not the anchors of its eval size "
                               f"{args.eval_spatial_size}; HF computes them per input, cannot convert")  # fmt: skip
    hf_state = project_to_hf_state(state)
    classes = int(args.num_classes)
    ids = category_ids(classes, args.remap_mscoco_category, stored_category_ids(checkpoint))
    names = resolve_class_names(checkpoint, classes)
    if not names and ids == list(COCO_CATEGORY_IDS):
        names = dict(enumerate(COCO_CLASSES))
    unnamed = {i: f"LABEL_{i}" for i in range(classes)}
    id2label = {i: names.get(c, "N/A") for i, c in enumerate(ids)} if names else unnamed
    kwargs = hf_config_kwargs(args, id2label)
    kwargs["backbone_config"] = transformers.RTDetrResNetConfig(
        **{k: v for k, v in kwargs["backbone_config"].items() if k != "model_type"}
    )
    transformers.RTDetrV2Config(**kwargs).save_pretrained(folder)
    height, width = args.eval_spatial_size or _DEFAULT_SIZE
    transformers.RTDetrImageProcessor(size={"height": int(height), "width": int(width)}).save_pretrained(folder)
    return hf_state
