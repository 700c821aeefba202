"""DETR training and evaluation entry point (`python main.py --help`).

The command line is the published one; flags after "new in this project" are additions.
"""

from __future__ import annotations

import argparse


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The published DETR argument parser, extended with this project's flags (same names and defaults)."""
    parser = argparse.ArgumentParser("DETR", add_help=add_help)
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
        help="dilate the last ResNet stage instead of striding it (DC5)",
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
    return parser


def _add_project_flags(parser: argparse.ArgumentParser) -> None:
    """Flags new in this project (none of them changes a published default behaviour)."""
    group = parser.add_argument_group("new in this project")
    group.add_argument("--config", default=None, help="YAML file of flag values (command-line flags override it)")
    # Model
    group.add_argument(
        "--backbone_weights",
        default="imagenet",
        help="'imagenet' (torchvision download, as published), 'none' (random init), or a local .pth path",
    )
    group.add_argument(
        "--num_classes", default=None, type=int, help="override num_classes (default: max category id + 1)"
    )
    group.add_argument(
        "--attention",
        default="sdpa",
        choices=("sdpa", "math"),
        help="attention kernel: fused scaled_dot_product_attention or the plain reference math",
    )
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
    group.add_argument("--max_iters_per_epoch", default=None, type=int, help="cap iterations per epoch (smoke runs)")
    group.add_argument("--finetune", default=None, help="checkpoint to fine-tune from; mismatched heads re-initialised")
    group.add_argument("--checkpoint_every", default=0, type=int, help="also checkpoint every N iterations")
    group.add_argument(
        "--skip_nonfinite", default=0, type=int, help="skip up to N batches with a non-finite loss instead of stopping"
    )
    group.add_argument(
        "--keep_new_schedule", action="store_true", help="on resume, keep lr/lr_drop/epochs from the command line"
    )
    group.add_argument("--dist_timeout", default=10, type=float, help="minutes before a stuck collective fails")
    group.add_argument("--no_progress", action="store_true", help="disable tqdm progress bars")


def main(args: argparse.Namespace) -> None:
    """Train and/or evaluate DETR as described by ``args``."""
    raise NotImplementedError("training loop: issue 4")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
