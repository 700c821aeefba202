"""HF model folders (``save_pretrained``: config.json + model.safetensors) <-> this project's checkpoints.

``hf_folder_to_checkpoint``: the checkpoint dict that ``--resume``, ``--finetune`` and predict.py take ('model'
with the published keys, 'args' with every flag that rebuilds the model, 'class_names' from ``id2label``).
``checkpoint_to_hf_folder``: the folder ``from_pretrained`` and ``pipeline("object-detection")`` load (config
from the checkpoint's architecture and flags, ``id2label`` from its class names, weights in safetensors, and the
image processor of the published evaluation transform). Needs ``safetensors``; writing the folder also needs
``transformers``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from interop.hf_detr import Arch, MappingError, hf_to_project_state, project_arch, project_to_hf_state
from interop.hf_rtdetr_config import checkpoint_to_hf_files, hf_folder_to_rtdetr

__all__ = ["checkpoint_to_hf_folder", "hf_config_flags", "hf_folder_to_checkpoint", "read_hf_folder"]

#: HF model_type -> our --model (DETR and Deformable DETR: this module's mapping).
HF_FAMILIES = {"detr": "detr", "deformable_detr": "deformable_detr"}
#: Families with their own converter: HF model_type -> (folder, config, weights, class names) -> checkpoint, and our
#: --model -> (checkpoint, folder) -> HF weights (after writing config.json and preprocessor_config.json).
HF_READERS = {"rt_detr_v2": hf_folder_to_rtdetr}
HF_WRITERS = {"rtdetrv2": checkpoint_to_hf_files}
#: timm ResNets whose tensors and arithmetic equal torchvision's (our --backbone names).
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
log = logging.getLogger("detr")
_NOT_A_NAME = re.compile(r"^(N/A|LABEL_\d+)$")  # HF's placeholders for unnamed ids


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"HF conversion needs '{module}': pip install {module.split('.')[0]}") from None


# ------------------------------------------------------------------------------------------ HF -> ours


def read_hf_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json as a dict, all weights) of an HF model folder (single or sharded safetensors)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a folder written by save_pretrained")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors; re-save the model with safe_serialization=True")
    load_file = _need("safetensors.torch").load_file
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return config, state


def _hf_backbone(config: Mapping[str, Any]) -> tuple[str, bool]:
    """(our --backbone, --dilation) of an HF config with a timm ResNet backbone (4.x or 5.x config.json)."""
    sub = config.get("backbone_config")
    if sub:
        if sub.get("model_type") != "timm_backbone":
            raise MappingError(f"HF backbone '{sub.get('model_type')}': only the timm ResNet layout "
                               "(use_timm_backbone=True, as the published checkpoints) converts")  # fmt: skip
        name, dilation = sub.get("backbone"), sub.get("output_stride") == 16
    elif config.get("use_timm_backbone", True):
        name, dilation = config.get("backbone") or "resnet50", False
    else:
        raise MappingError("HF config with use_timm_backbone=False and no backbone_config: unknown backbone")
    name = str(name).split(".")[0]  # timm's pretrained tag ('resnet50.a1_in1k') does not change the layout
    if name not in RESNETS:
        raise MappingError(f"HF timm backbone '{name}': convertible ones are {', '.join(RESNETS)}")
    return name, bool(dilation or config.get("dilation"))


def _same(config: Mapping[str, Any], a: str, b: str) -> Any:
    if config.get(a) != config.get(b):
        raise MappingError(f"HF {a}={config.get(a)} but {b}={config.get(b)}: this project uses one value for both")
    return config[a]


def hf_config_flags(config: Mapping[str, Any], masks: bool) -> tuple[Arch, list[str]]:
    """The `Arch` and our command-line flags (``--model`` first) of an HF config.json."""
    family = HF_FAMILIES.get(config.get("model_type", ""))
    if family is None:
        convertible = ", ".join([*HF_FAMILIES, *HF_READERS])
        raise MappingError(f"HF model_type '{config.get('model_type')}': convertible ones are {convertible}")
    if config.get("activation_function", "relu") != "relu":
        raise MappingError(f"HF activation_function '{config['activation_function']}': this project uses relu")
    if config.get("num_channels", 3) != 3:
        raise MappingError(f"HF num_channels {config['num_channels']}: this project takes RGB images")
    backbone, dilation = _hf_backbone(config)
    learned = {"sine": False, "learned": True}.get(config.get("position_embedding_type", "sine"))
    if learned is None:
        raise MappingError(f"HF position_embedding_type '{config['position_embedding_type']}': sine or learned only")
    flags = ["--model", family, "--backbone", backbone, "--backbone_weights", "none",
             "--hidden_dim", str(config.get("d_model", 256)),
             "--nheads", str(_same(config, "encoder_attention_heads", "decoder_attention_heads")),
             "--dim_feedforward", str(_same(config, "encoder_ffn_dim", "decoder_ffn_dim")),
             "--enc_layers", str(config["encoder_layers"]), "--dec_layers", str(config["decoder_layers"]),
             "--num_classes", str(len(config["id2label"])), "--dropout", str(config.get("dropout", 0.1))]  # fmt: skip
    flags += ["--dilation"] * dilation + ["--position_embedding", "learned"] * learned + ["--masks"] * masks
    arch = Arch(family, config["encoder_layers"], config["decoder_layers"], masks=masks, learned_pos=learned)
    if family == "detr":
        return arch, flags + ["--num_queries", str(config["num_queries"])]
    two_stage, refine = bool(config.get("two_stage")), bool(config.get("with_box_refine"))
    levels = int(config.get("num_feature_levels", 4))
    queries = config["two_stage_num_proposals"] if two_stage else config["num_queries"]
    flags += ["--num_queries", str(queries), "--num_feature_levels", str(levels),
              "--enc_n_points", str(config.get("encoder_n_points", 4)),
              "--dec_n_points", str(config.get("decoder_n_points", 4))]  # fmt: skip
    flags += ["--with_box_refine"] * refine + ["--two_stage"] * two_stage
    arch = Arch(family, arch.enc_layers, arch.dec_layers, learned_pos=learned, num_feature_levels=levels,
                with_box_refine=refine, two_stage=two_stage)  # fmt: skip
    return arch, flags


def class_names_from_id2label(id2label: Mapping[Any, str]) -> dict[int, str]:
    """``{id: name}`` of an HF ``id2label``, HF's placeholders ('N/A', 'LABEL_<i>') left out."""
    return {int(i): str(n) for i, n in sorted(id2label.items(), key=lambda kv: int(kv[0])) if not _NOT_A_NAME.match(n)}


def hf_folder_to_checkpoint(folder: str | Path) -> dict[str, Any]:
    """An HF DETR / Deformable DETR / RT-DETRv2 folder as this project's checkpoint dict ('model', 'args',
    'class_names')."""
    from cli.arguments import get_args_parser

    config, hf_state = read_hf_folder(folder)
    reader = HF_READERS.get(config.get("model_type", ""))
    if reader is not None:
        return reader(folder, config, hf_state, class_names_from_id2label(config.get("id2label") or {}))
    masks = any(k.startswith("mask_head.") for k in hf_state)
    arch, flags = hf_config_flags(config, masks)
    if arch.family == "detr" and config.get("auxiliary_loss"):
        log.warning(
            "HF config has auxiliary_loss=true: HF's DETR then passes LayerNorm'ed states between decoder layers; "
            "the converted model computes the published DETR (as HF does with auxiliary_loss=false)"
        )
    state = hf_to_project_state(hf_state, arch)
    args = get_args_parser().parse_args(flags)
    checkpoint = {
        "model": state,
        "args": {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")},
        "converted_from": f"HF {config.get('model_type')} ({', '.join(config.get('architectures') or [])})",
    }
    names = class_names_from_id2label(config.get("id2label") or {})
    if names:
        checkpoint["class_names"] = names
    return checkpoint


# ------------------------------------------------------------------------------------------ ours -> HF


def _resnet_of(state: Mapping[str, Tensor], body: str) -> str:
    bottleneck = f"{body}layer1.0.conv3.weight" in state
    layer3 = len({k[len(body) + 7 :].split(".")[0] for k in state if k.startswith(f"{body}layer3.")})
    name = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}.get(
        (bottleneck, layer3)
    )
    if name is None:
        raise MappingError(f"checkpoint backbone under {body} is not a {'/'.join(RESNETS)}; HF's timm layout needs one")
    return name


def _check_convertible(args: argparse.Namespace, arch: Arch) -> None:
    """Flags that change the outputs without weights and have no HF equivalent."""
    problems = {
        "--spatial_prior": args.spatial_prior != "none",
        "--box_refine": bool(args.box_refine),
        "--backbone_stages": args.backbone_stages != 4,
        "--position_embedding_scale": arch.family != "detr"
        and not math.isclose(args.position_embedding_scale, 2 * math.pi),
    }
    bad = [flag for flag, wrong in problems.items() if wrong]
    if bad:
        raise MappingError(f"checkpoint trained with {', '.join(bad)}: HF's model has no such option; cannot convert")
    if arch.two_stage and not arch.with_box_refine:
        raise MappingError("two-stage Deformable DETR without --with_box_refine: HF requires box refinement with it")


def hf_config_kwargs(state: Mapping[str, Tensor], args: argparse.Namespace, arch: Arch,
                     names: Mapping[int, str]) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of ``DetrConfig`` / ``DeformableDetrConfig`` for one of our models."""
    o = "detr." if arch.masks else ""
    detr = arch.family == "detr"
    classes = state[f"{o}class_embed.weight" if detr else "class_embed.0.weight"].shape[0] - int(detr)
    hidden = state[f"{o}transformer.encoder.layers.0.linear1.weight"].shape
    id2label = {i: names.get(i, "N/A") for i in range(classes)} if names else {i: f"LABEL_{i}" for i in range(classes)}
    kwargs: dict[str, Any] = dict(
        use_timm_backbone=True, backbone=_resnet_of(state, f"{o}backbone.0.body."), use_pretrained_backbone=False,
        dilation=bool(args.dilation), num_channels=3, d_model=hidden[1], encoder_ffn_dim=hidden[0],
        decoder_ffn_dim=hidden[0], encoder_layers=arch.enc_layers, decoder_layers=arch.dec_layers,
        encoder_attention_heads=args.nheads, decoder_attention_heads=args.nheads, activation_function="relu",
        dropout=float(args.dropout), position_embedding_type="learned" if arch.learned_pos else "sine",
        id2label=id2label, label2id={n: i for i, n in id2label.items()},
        # HF's DETR decoder with auxiliary_loss=True feeds the final-LayerNorm'ed states to the next layer,
        # which changes every output but the first layer's; the published model (and HF's default) does not.
        auxiliary_loss=False,
    )  # fmt: skip
    if detr:
        kwargs.update(num_queries=state[f"{o}query_embed.weight"].shape[0], eos_coefficient=float(args.eos_coef))
        kwargs["architectures"] = ["DetrForSegmentation" if arch.masks else "DetrForObjectDetection"]
        return kwargs
    queries = int(args.num_queries) if arch.two_stage else state["query_embed.weight"].shape[0]
    kwargs.update(
        num_queries=queries, two_stage_num_proposals=queries, num_feature_levels=arch.num_feature_levels,
        encoder_n_points=int(args.enc_n_points), decoder_n_points=int(args.dec_n_points),
        with_box_refine=arch.with_box_refine, two_stage=arch.two_stage, focal_alpha=float(args.focal_alpha),
        architectures=["DeformableDetrForObjectDetection"],
    )  # fmt: skip
    return kwargs


def checkpoint_to_hf_folder(checkpoint: Mapping[str, Any], folder: str | Path) -> Path:
    """Write one of our checkpoints (DETR, DETR --masks, Deformable DETR, RT-DETRv2) as an HF ``save_pretrained``
    folder."""
    from cli.arguments import get_args_parser
    from run.checkpoint import checkpoint_args_to_namespace, inference_weights
    from run.model_loading import checkpoint_family
    from util.class_names import resolve_class_names

    if not isinstance(inference_weights(checkpoint), Mapping):
        raise MappingError("checkpoint has no 'model' state dict")
    family = checkpoint_family(checkpoint)
    folder = Path(folder)
    if family in HF_WRITERS:
        folder.mkdir(parents=True, exist_ok=True)
        hf_state = HF_WRITERS[family](checkpoint, folder)
        _need("safetensors.torch").save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    if not isinstance(checkpoint.get("model"), Mapping):
        raise MappingError("checkpoint has no 'model' state dict")
    state = checkpoint["model"]
    arch = project_arch(state, family)
    args = get_args_parser().parse_args(["--model", family])
    stored = checkpoint_args_to_namespace(checkpoint.get("args"))
    if stored is not None:
        vars(args).update(vars(stored))
    _check_convertible(args, arch)
    hf_state = project_to_hf_state(state, arch)
    detr = family == "detr"
    classes = state[f"{'detr.' * arch.masks}class_embed.weight" if detr else "class_embed.0.weight"].shape[0]
    names = resolve_class_names(checkpoint, classes - int(detr))
    kwargs = hf_config_kwargs(state, args, arch, names)

    transformers = _need("transformers")
    config_class = transformers.DetrConfig if detr else transformers.DeformableDetrConfig
    processor_class = transformers.DetrImageProcessor if detr else transformers.DeformableDetrImageProcessor
    folder.mkdir(parents=True, exist_ok=True)
    config_class(**kwargs).save_pretrained(folder)
    processor_class(format="coco_panoptic" if arch.masks else "coco_detection").save_pretrained(folder)
    _need("safetensors.torch").save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
