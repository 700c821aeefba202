"""The command line of every detector family: the published flags of each family and this project's additions.

``--model NAME`` selects the family (``models.FAMILIES``). Every flag the user did not give takes that family's
published default (``Family.defaults``), already in ``get_args_parser().parse_args(argv)``; flags given on the
command line (or in a ``--config`` YAML) always win. A flag only other families read is a one-line error.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Collection, Sequence
from typing import Any, NoReturn

from models import FAMILIES
from models.family import Family

__all__ = [
    "FamilyArgumentParser",
    "apply_family_defaults",
    "check_family_flags",
    "family_flag_error",
    "family_only_flags",
    "get_args_parser",
]

_UNSET = object()


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"--model {name}: expected one of {tuple(FAMILIES)}")
    return FAMILIES[name]


def family_only_flags() -> dict[str, tuple[str, ...]]:
    """Flags some families read and others do not: destination -> the families whose settings read it.

    Published DETR flags are left out: every published family parser has them, so they stay accepted everywhere
    (a family refuses the ones it cannot build with in its own ``build``).
    """
    published = _published_detr_dests()
    readers: dict[str, list[str]] = {}
    for name, family in FAMILIES.items():
        for dest in family.flags:
            readers.setdefault(dest, []).append(name)
    return {
        dest: tuple(names)
        for dest, names in sorted(readers.items())
        if len(names) < len(FAMILIES) and dest not in published
    }


def family_flag_error(dests: Sequence[str], family: str) -> str:
    """The one-line message for flags in ``dests`` (in order) that ``--model family`` does not read."""
    first = dests[0]
    refused = _family(family).refused_flags
    if first in refused:
        return f"--{first} is {refused[first]} (--model is {family})"
    table = family_only_flags()
    owners = table.get(first, ())
    titles = " / ".join(FAMILIES[f].title for f in owners)
    # Suggest the families that read every flag given (else those of the first).
    common = [f for f in owners if all(f in table.get(d, ()) for d in dests)] or owners
    suggestion = " or ".join(f"--model {f}" for f in common)
    ignored = ", ".join(f"--{d}" for d in dests)
    return f"--{first} is a {titles} flag: add {suggestion} (--model is {family}, which ignores {ignored})"


def check_family_flags(
    args: argparse.Namespace,
    command_line: Collection[str],
    from_config: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Raise ValueError (one line) when a flag is given that ``args.model`` does not read (``family_only_flags``)
    or refuses (``Family.refused_flags``).

    Args:
        command_line: destinations given on the command line: always checked.
        from_config: destinations set by a ``--config`` YAML: checked only where the value differs from the
            parser default, so a run's own dumped config.yaml (which lists every flag) stays loadable.
        defaults: destination -> parser default (default: ``get_args_parser()``'s).
    """
    family = _family(args.model)
    actions = get_args_parser()._actions
    if defaults is None:
        defaults = {a.dest: a.default for a in actions}
    foreign = {d for d in family_only_flags() if d not in family.flags} | set(family.refused_flags)
    values = vars(args)
    given = [
        a.dest for a in actions
        if a.dest in foreign and a.dest in values
        and (a.dest in command_line or (a.dest in from_config and values[a.dest] != defaults.get(a.dest)))
    ]  # fmt: skip
    given.sort(key=lambda d: d not in family.refused_flags)  # stable: otherwise in the parser's order
    if given:
        raise ValueError(family_flag_error(given, args.model))


def apply_family_defaults(args: argparse.Namespace, explicit: set[str] | frozenset[str]) -> argparse.Namespace:
    """Set every destination not in ``explicit`` to ``args.model``'s published default (``Family.defaults``).

    The one place family defaults are applied (the parser, a YAML's ``model:`` and a resumed checkpoint's family
    all come here). Part of parsing: it fills the Namespace being built.
    """
    for dest, value in _family(args.model).defaults.items():
        if dest not in explicit:
            setattr(args, dest, list(value) if isinstance(value, list) else value)
    return args


def _published_detr_dests() -> frozenset[str]:
    """Destinations of the published DETR flags (the parser's ungrouped options)."""
    parser = get_args_parser()
    return frozenset(a.dest for a in parser._optionals._group_actions if a.dest != "help")


class FamilyArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose defaults follow ``--model``: flags not present in argv take the family default."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extras = super().parse_known_args(argv, namespace)
        if namespace is None:  # a caller's own namespace (e.g. a probe of explicit flags) is left as given
            probe = argparse.Namespace(**{a.dest: _UNSET for a in self._actions if a.dest != "help"})
            present, _ = super().parse_known_args(argv, probe)
            apply_family_defaults(parsed, {d for d, v in vars(present).items() if v is not _UNSET})
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        """One short line instead of the whole usage: an unknown flag gets the closest known flag suggested."""
        if message.startswith("unrecognized arguments:"):
            message = "; ".join(self._unknown_flag_hint(token) for token in message.split(":", 1)[1].split()
                                if token.startswith("-")) or message  # fmt: skip
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

    def _unknown_flag_hint(self, token: str) -> str:
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith("--")], n=1)
        return f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else "")

    @staticmethod
    def apply_family_defaults(args: argparse.Namespace, explicit: set[str] | frozenset[str]) -> argparse.Namespace:
        """``apply_family_defaults`` (called by cli.config when a YAML file sets ``model``)."""
        return apply_family_defaults(args, explicit)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The published DETR argument parser, extended with this project's flags (same names and defaults)."""
    parser = FamilyArgumentParser(
        prog="main.py",
        description="Train and evaluate DETR-family detectors: DETR, Deformable DETR and DINO (--model).",
        add_help=add_help,
    )
    parser.add_argument("--model", default="detr", choices=tuple(FAMILIES),
                        help="detector family; every flag not given takes that family's published default")  # fmt: skip
    parser.add_argument("--lr", default=1e-4, type=float)
    parser.add_argument("--lr_backbone", default=1e-5, type=float)
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--lr_drop", default=200, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0 disables)")

    parser.add_argument(
        "--frozen_weights",
        type=str,
        default=None,
        help="detector checkpoint to freeze; only the mask head trains (segmentation stage 2)",
    )
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="ResNet: resnet18/34/50/101 (rtdetrv2: presnet18vd/34vd/50vd/101vd); Swin (detr, "
                        "deformable_detr, dino): swin_T_224_1k, swin_B_224_22k, swin_B_384_22k, swin_L_224_22k, "
                        "swin_L_384_22k; or timm:NAME (any timm features_only model)")  # fmt: skip
    parser.add_argument(
        "--dilation",
        action="store_true",
        help="dilate the last ResNet stage instead of striding it (DC5: output stride 16; any --backbone)",
    )
    parser.add_argument(
        "--position_embedding",
        default="sine",
        type=str,
        choices=("sine", "learned"),
        help="2D position encoding of the feature map",
    )

    parser.add_argument("--enc_layers", default=6, type=int, help="transformer encoder layers")
    parser.add_argument("--dec_layers", default=6, type=int, help="transformer decoder layers")
    parser.add_argument(
        "--dim_feedforward",
        default=2048,
        type=int,
        help="hidden size of the transformer feed-forward blocks",
    )
    parser.add_argument("--hidden_dim", default=256, type=int, help="transformer width")
    parser.add_argument("--dropout", default=0.1, type=float, help="transformer dropout")
    parser.add_argument("--nheads", default=8, type=int, help="attention heads")
    parser.add_argument("--num_queries", default=100, type=int, help="object queries (maximum detections per image)")
    parser.add_argument("--pre_norm", action="store_true")

    parser.add_argument("--masks", action="store_true", help="add the mask head (segmentation)")

    parser.add_argument(
        "--no_aux_loss",
        dest="aux_loss",
        action="store_false",
        help="no losses on intermediate decoder layers",
    )
    parser.add_argument("--set_cost_class", default=1, type=float, help="matching cost weight of the class probability")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="matching cost weight of the box L1 distance")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="matching cost weight of the box GIoU")
    parser.add_argument("--mask_loss_coef", default=1, type=float)
    parser.add_argument("--dice_loss_coef", default=1, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--eos_coef", default=0.1, type=float, help="cross-entropy weight of the no-object class")

    parser.add_argument("--dataset_file", default="coco")
    parser.add_argument("--coco_path", type=str)
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true",
                        help="accepted as published; it has no effect on COCO-format data there either")  # fmt: skip

    parser.add_argument("--output_dir", default="", help="folder for checkpoints and logs (empty: write nothing)")
    parser.add_argument("--device", default="cuda", help="cuda, mps or cpu (a default cuda falls back when absent)")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint (path, https URL, or 'auto')")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)

    parser.add_argument("--world_size", default=1, type=int,
                        help="accepted as published; the process count comes from torchrun / SLURM")  # fmt: skip
    parser.add_argument("--dist_url", default="env://", help="process-group init method")

    _add_project_flags(parser)
    _add_family_flags(parser)
    _add_rtdetr_flags(parser)
    return parser


def _add_project_flags(parser: argparse.ArgumentParser) -> None:
    """Flags new in this project (none of them changes a published default behaviour)."""
    group = parser.add_argument_group("new in this project")
    group.add_argument("--config", default=None, help="YAML file of flag values (command-line flags override it)")
    # Model
    group.add_argument("--backbone_weights", default="imagenet",
                       help="'imagenet' (torchvision ResNet download, published), 'none' (random) or a local .pth: a "
                       "torchvision ResNet, a published ImageNet Swin file or a timm state dict")  # fmt: skip
    group.add_argument("--use_checkpoint", action="store_true",
                       help="activation checkpointing in the Swin / timm backbone (published DINO flag)")  # fmt: skip
    group.add_argument("--backbone_stages", default=4, type=int, choices=(2, 3, 4),
                       help="ResNet stages kept: 4 (published, stride 32), 3 (stride 16), 2 (stride 8)")  # fmt: skip
    group.add_argument("--num_classes", default=None, type=int, help="override (default: max category id + 1)")
    group.add_argument("--attention", default="sdpa", choices=("sdpa", "math"),
                       help="attention kernel: fused scaled_dot_product_attention or plain reference math")  # fmt: skip
    group.add_argument("--spatial_prior", default="none", choices=("none", "gaussian"),
                       help="decoder attention prior around each query's previous box (no new weights; 'none' = "
                       "published)")  # fmt: skip
    group.add_argument("--box_refine", action="store_true",
                       help="each decoder layer refines the previous layer's box (no new weights)")  # fmt: skip
    group.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="mixed precision")
    group.add_argument("--compile", action="store_true", help="torch.compile the backbone and transformer")
    group.add_argument("--channels_last", action="store_true", help="channels_last memory format for the backbone")
    # Data
    group.add_argument("--size_divisibility", default=1, type=int, help="pad batches to multiples of N (1 = published)")
    group.add_argument(
        "--input_scale",
        default=1.0,
        type=float,
        help="multiply every published image size (train scales, crops, 800/1333 eval sizes) by this factor",
    )
    group.add_argument("--train_img_folder", default=None, help="train images folder (default <coco_path>/train2017)")
    group.add_argument("--val_img_folder", default=None, help="val images folder (default <coco_path>/val2017)")
    group.add_argument(
        "--train_ann_file",
        default=None,
        help="train annotation JSON (default <coco_path>/annotations/instances_train2017.json)",
    )
    group.add_argument(
        "--val_ann_file", default=None, help="val annotations (default <coco_path>/annotations/instances_val2017.json)"
    )
    group.add_argument("--skip_bad_images", action="store_true", help="warn and skip unreadable samples")
    group.add_argument("--synthetic_dir", default=None, help="cache folder of the generated dataset")
    group.add_argument("--synthetic_train_size", default=None, type=int, help="generated training images")
    group.add_argument("--synthetic_val_size", default=None, type=int, help="generated validation images")
    # Training loop
    group.add_argument("--eval_batch_size", default=None, type=int, help="evaluation batch size (default batch_size)")
    group.add_argument("--eval_backend", default="pycocotools", choices=("pycocotools", "faster"))
    group.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and after the last)")
    group.add_argument("--max_iters_per_epoch", default=None, type=int,
                       help="cap the iterations of every training epoch AND of every evaluation (smoke runs): the AP "
                       "is then on a subset of the validation set, and the log says on how many images")  # fmt: skip
    group.add_argument("--finetune", default=None, help="checkpoint to fine-tune from; mismatched heads re-initialised")
    group.add_argument("--checkpoint_every", default=0, type=int, help="also checkpoint every N iterations")
    group.add_argument(
        "--skip_nonfinite", default=0, type=int, help="skip up to N batches with a non-finite loss instead of stopping"
    )
    group.add_argument(
        "--keep_new_schedule",
        action="store_true",
        help="on resume, use this command line's lrs, weight decays, lr drops and warm-up length instead of the "
        "checkpoint's",
    )
    group.add_argument("--dist_timeout", default=10, type=float, help="minutes before a stuck collective fails")
    group.add_argument("--no_progress", action="store_true",
                       help="no tqdm progress bars; one log line per minute (and at the end) instead")  # fmt: skip
    group.add_argument("--threads", default=None, type=int,
                       help="CPU intra-op threads of the main process (default: OMP_NUM_THREADS when set, else the "
                       "usable cores minus --num_workers, at least 1; shown at start-up). On a machine busy with "
                       "other jobs, --threads 1 can be 10x faster for small models")  # fmt: skip


def _add_family_flags(parser: argparse.ArgumentParser) -> None:
    """The published Deformable DETR and DINO flags (defaults: FAMILY_DEFAULTS; ignored by --model detr)."""
    group = parser.add_argument_group("Deformable DETR and DINO (published names)")
    group.add_argument("--lr_backbone_names", default=["backbone"], type=str, nargs="+",
                       help="parameters whose name contains one of these train at --lr_backbone")  # fmt: skip
    group.add_argument("--lr_linear_proj_names", default=[], type=str, nargs="*",
                       help="names containing one of these train at lr x --lr_linear_proj_mult")  # fmt: skip
    group.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    group.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+",
                       help="MultiStepLR milestones instead of StepLR(--lr_drop)")  # fmt: skip
    group.add_argument("--sgd", action="store_true", help="SGD (momentum 0.9) instead of AdamW")
    group.add_argument("--position_embedding_scale", default=2 * math.pi, type=float)
    group.add_argument("--num_feature_levels", default=4, type=int, help="multi-scale feature levels")
    group.add_argument("--enc_n_points", default=4, type=int, help="deformable sampling points per level (encoder)")
    group.add_argument("--dec_n_points", default=4, type=int, help="deformable sampling points per level (decoder)")
    group.add_argument("--with_box_refine", action="store_true", help="iterative bounding-box refinement")
    group.add_argument("--two_stage", action="store_true", help="two-stage Deformable DETR (encoder proposals)")
    group.add_argument("--cls_loss_coef", default=2, type=float, help="focal classification loss weight")
    group.add_argument("--focal_alpha", default=0.25, type=float)
    # DINO (config/DINO/DINO_4scale.py names)
    group.add_argument("--return_interm_indices", default=[1, 2, 3], type=int, nargs="+",
                       help="DINO: ResNet stages (0 = layer1) used as feature levels; 5-scale: 0 1 2 3")  # fmt: skip
    group.add_argument("--pe_temperatureH", default=20, type=int, help="DINO: sine temperature along y")
    group.add_argument("--pe_temperatureW", default=20, type=int, help="DINO: sine temperature along x")
    group.add_argument("--dn_number", default=100, type=int, help="DINO: denoising queries (positive + negative)")
    group.add_argument("--dn_label_noise_ratio", default=0.5, type=float)
    group.add_argument("--dn_box_noise_scale", default=0.4, type=float)
    group.add_argument("--dn_labelbook_size", default=None, type=int,
                       help="DINO: label embeddings (default: num_classes, 91 for COCO)")  # fmt: skip
    group.add_argument("--num_select", default=300, type=int, help="DINO and RT-DETRv2: detections kept per image")
    group.add_argument("--interm_loss_coef", default=1.0, type=float, help="DINO: weight of the encoder losses")
    group.add_argument("--no_interm_box_loss", action="store_true", help="DINO: no box losses on encoder outputs")


def _add_rtdetr_flags(parser: argparse.ArgumentParser) -> None:
    """The RT-DETRv2 flags (rtdetrv2_pytorch names; its defaults: ``models.rtdetrv2.DEFAULTS``).

    The solver flags (weight decay of norms and biases, EMA, warm-up, SyncBatchNorm) are read by the training loop
    for every family; their parser defaults keep the other families' published behaviour (no EMA, no warm-up).
    """
    group = parser.add_argument_group("RT-DETRv2 (published names)")
    # Model
    group.add_argument("--freeze_at", default=0, type=int,
                       help="RT-DETRv2: freeze the PResNet stem and first N stages (-1: none)")  # fmt: skip
    group.add_argument("--freeze_norm", dest="freeze_norm", default=True, action="store_true",
                       help="RT-DETRv2: FrozenBatchNorm2d in the backbone (default)")  # fmt: skip
    group.add_argument("--no_freeze_norm", dest="freeze_norm", action="store_false",
                       help="RT-DETRv2: trainable BatchNorm2d in the backbone (r18vd / r34vd recipes)")  # fmt: skip
    group.add_argument("--enc_hidden_dim", default=256, type=int, help="RT-DETRv2: hybrid encoder width")
    group.add_argument("--enc_dim_feedforward", default=1024, type=int,
                       help="RT-DETRv2: feed-forward size of the encoder's AIFI layer")  # fmt: skip
    group.add_argument("--enc_expansion", default=1.0, type=float,
                       help="RT-DETRv2: width factor of the encoder's CSP blocks")  # fmt: skip
    group.add_argument("--eval_idx", default=-1, type=int,
                       help="RT-DETRv2: decoder layer whose boxes evaluation returns (-1: the last)")  # fmt: skip
    group.add_argument("--eval_spatial_size", default=[640, 640], type=int, nargs="*", metavar="N",
                       help="RT-DETRv2: H W of evaluation inputs, whose anchors are saved buffers (no values: "
                       "anchors per input)")  # fmt: skip
    # Solver (every family; the parser defaults are the published behaviour of DETR, Deformable DETR and DINO)
    group.add_argument("--norm_weight_decay", default=None, type=float,
                       help="weight decay of normalisation-layer parameters (default: --weight_decay)")  # fmt: skip
    group.add_argument("--bias_weight_decay", default=None, type=float,
                       help="weight decay of encoder/decoder biases (default: --weight_decay)")  # fmt: skip
    group.add_argument("--ema_decay", default=0.0, type=float,
                       help="EMA of the weights with this decay, evaluated and checkpointed (0: off)")  # fmt: skip
    group.add_argument("--ema_warmups", default=2000, type=int,
                       help="EMA decay ramp: decay x (1 - exp(-updates / N))")  # fmt: skip
    group.add_argument("--warmup_iters", default=0, type=int,
                       help="linear learning-rate warm-up over N optimizer steps (0: off)")  # fmt: skip
    group.add_argument("--sync_bn", dest="sync_bn", default=False, action="store_true",
                       help="SyncBatchNorm under distributed training")  # fmt: skip
    group.add_argument("--no_sync_bn", dest="sync_bn", action="store_false", help="no SyncBatchNorm")
    # Data (RT-DETRv2's transforms.v2 pipeline)
    group.add_argument("--aug_stop_epoch", default=71, type=int,
                       help="RT-DETRv2: first epoch without photometric distortion, zoom-out and IoU crop")  # fmt: skip
    group.add_argument("--multiscale_sizes", default=[480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800],
                       type=int, nargs="*", metavar="S",
                       help="RT-DETRv2: square sizes drawn per training batch (no values: off)")  # fmt: skip
    group.add_argument("--multiscale_stop_epoch", default=71, type=int,
                       help="RT-DETRv2: first epoch at the fixed training size")  # fmt: skip
    group.add_argument("--remap_mscoco_category", dest="remap_mscoco_category", default=True, action="store_true",
                       help="RT-DETRv2: labels = index of the category id among the dataset's sorted ids (COCO: "
                       "0..79), mapped back in the detections (default)")  # fmt: skip
    group.add_argument("--no_remap_mscoco_category", dest="remap_mscoco_category", action="store_false",
                       help="RT-DETRv2: labels = the category ids")  # fmt: skip
