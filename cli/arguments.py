"""The command line of every DETR-family detector: the published DETR flags, the published Deformable DETR and
DINO flags, and this project's additions.

``--model detr|deformable_detr|dino`` selects the family. Every flag the user did not give takes that family's
published default (``FAMILY_DEFAULTS``), already in ``get_args_parser().parse_args(argv)``; flags given on the
command line (or in a ``--config`` YAML) always win.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Collection, Sequence
from typing import Any, NoReturn

__all__ = [
    "FAMILY_DEFAULTS",
    "FAMILY_FLAGS",
    "FamilyArgumentParser",
    "apply_family_defaults",
    "check_family_flags",
    "family_flag_error",
    "get_args_parser",
]

# Published defaults of each family that differ from DETR's (the parser's own defaults are DETR's).
# Deformable DETR: the authors' main.py / configs; DINO: config/DINO/DINO_4scale.py (see ../shared/DESIGN_*.md).
_DEFORMABLE = {
    "lr": 2e-4,
    "lr_backbone": 2e-5,
    "lr_backbone_names": ["backbone.0"],
    "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
    "epochs": 50,
    "lr_drop": 40,
    "dim_feedforward": 1024,
    "num_queries": 300,
    "set_cost_class": 2.0,
    "cls_loss_coef": 2.0,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "detr": {},
    "deformable_detr": _DEFORMABLE,
    "dino": {
        **_DEFORMABLE,
        "lr": 1e-4,
        "lr_backbone": 1e-5,
        "epochs": 12,
        "lr_drop": 11,
        "dim_feedforward": 2048,
        "dropout": 0.0,
        "num_queries": 900,
        "cls_loss_coef": 1.0,
        "position_embedding_scale": 2 * math.pi,
    },
}
_UNSET = object()

# Flags only some families read (destination -> those families), from each family's build: models/deformable_detr.py,
# models/dino.py, models/position_encoding.py and the focal criteria. Every flag not listed is read by all families
# (the optimizer flags --lr_backbone_names, --sgd, ... by main.build_optimizer) or is a published DETR flag, which
# stays accepted everywhere. Giving a listed flag to another family is an error (check_family_flags).
_MULTISCALE = ("deformable_detr", "dino")
FAMILY_FLAGS: dict[str, tuple[str, ...]] = {
    "num_feature_levels": _MULTISCALE,
    "enc_n_points": _MULTISCALE,
    "dec_n_points": _MULTISCALE,
    "position_embedding_scale": _MULTISCALE,
    "cls_loss_coef": _MULTISCALE,
    "focal_alpha": _MULTISCALE,
    "with_box_refine": ("deformable_detr",),
    "two_stage": ("deformable_detr",),
    "return_interm_indices": ("dino",),
    "pe_temperatureH": ("dino",),
    "pe_temperatureW": ("dino",),
    "dn_number": ("dino",),
    "dn_label_noise_ratio": ("dino",),
    "dn_box_noise_scale": ("dino",),
    "dn_labelbook_size": ("dino",),
    "num_select": ("dino",),
    "interm_loss_coef": ("dino",),
    "no_interm_box_loss": ("dino",),
}
_FAMILY_NAMES = {"detr": "DETR", "deformable_detr": "Deformable DETR", "dino": "DINO"}
# DINO always selects encoder proposals (two-stage) and refines boxes layer by layer; the published DINO code has
# neither flag.
_DINO_BUILT_IN = {"two_stage": "always two-stage", "with_box_refine": "always refines boxes layer by layer"}


def family_flag_error(dests: Sequence[str], family: str) -> str:
    """The one-line message for flags in ``dests`` (in order) that ``--model family`` does not read."""
    first = dests[0]
    if family == "dino" and first in _DINO_BUILT_IN:
        return f"--{first} is a Deformable DETR flag: DINO is {_DINO_BUILT_IN[first]}; drop --{first} (--model is dino)"
    owners = " / ".join(_FAMILY_NAMES[f] for f in FAMILY_FLAGS[first])
    # Suggest the families that read every flag given (else those of the first).
    common = [f for f in FAMILY_FLAGS[first] if all(f in FAMILY_FLAGS[d] for d in dests)] or FAMILY_FLAGS[first]
    suggestion = " or ".join(f"--model {f}" for f in common)
    ignored = ", ".join(f"--{d}" for d in dests)
    return f"--{first} is a {owners} flag: add {suggestion} (--model is {family}, which ignores {ignored})"


def check_family_flags(
    args: argparse.Namespace,
    command_line: Collection[str],
    from_config: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Raise ValueError (one line) when a flag of ``FAMILY_FLAGS`` is given but ``args.model`` does not read it.

    Args:
        command_line: destinations given on the command line: always checked.
        from_config: destinations set by a ``--config`` YAML: checked only where the value differs from the
            parser default, so a run's own dumped config.yaml (which lists every flag) stays loadable.
        defaults: destination -> parser default (default: ``get_args_parser()``'s).
    """
    family = getattr(args, "model", "detr")
    if defaults is None:
        defaults = {a.dest: a.default for a in get_args_parser()._actions}
    given = [
        dest for dest, families in FAMILY_FLAGS.items()
        if family not in families and hasattr(args, dest)
        and (dest in command_line or (dest in from_config and getattr(args, dest) != defaults.get(dest)))
    ]  # fmt: skip
    if given:
        raise ValueError(family_flag_error(given, family))


def apply_family_defaults(args: argparse.Namespace, explicit: set[str] | frozenset[str]) -> argparse.Namespace:
    """Set every destination not in ``explicit`` to ``args.model``'s published default (in place)."""
    family = getattr(args, "model", "detr")
    for dest, value in FAMILY_DEFAULTS[family].items():
        if dest not in explicit:
            setattr(args, dest, list(value) if isinstance(value, list) else value)
    return args


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
    parser.add_argument("--model", default="detr", choices=tuple(FAMILY_DEFAULTS),
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
    parser.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet: resnet18/34/50/101")
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
    parser.add_argument("--remove_difficult", action="store_true")

    parser.add_argument("--output_dir", default="", help="folder for checkpoints and logs (empty: write nothing)")
    parser.add_argument("--device", default="cuda", help="cuda, mps or cpu (a default cuda falls back when absent)")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint (path, https URL, or 'auto')")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)

    parser.add_argument("--world_size", default=1, type=int, help="number of processes (set by torchrun/SLURM)")
    parser.add_argument("--dist_url", default="env://", help="process-group init method")

    _add_project_flags(parser)
    _add_family_flags(parser)
    return parser


def _add_project_flags(parser: argparse.ArgumentParser) -> None:
    """Flags new in this project (none of them changes a published default behaviour)."""
    group = parser.add_argument_group("new in this project")
    group.add_argument("--config", default=None, help="YAML file of flag values (command-line flags override it)")
    # Model
    group.add_argument("--backbone_weights", default="imagenet",
                       help="'imagenet' (torchvision download, published), 'none' (random) or a .pth")  # fmt: skip
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
        "--keep_new_schedule", action="store_true", help="on resume, keep lr/lr_drop/epochs from the command line"
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
    group.add_argument("--num_select", default=300, type=int, help="DINO: detections kept per image")
    group.add_argument("--interm_loss_coef", default=1.0, type=float, help="DINO: weight of the encoder losses")
    group.add_argument("--no_interm_box_loss", action="store_true", help="DINO: no box losses on encoder outputs")
