"""Plot training curves from log.txt files and precision-recall curves from evaluation results, as PNG.

Examples:
    python tools/plot_logs.py outputs/run1 outputs/run2 --fields loss class_error AP --output curves.png
    python tools/plot_logs.py --pr outputs/run1/eval/latest.pth --pr_output pr.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.plot_utils import plot_logs, plot_precision_recall  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of this tool."""
    parser = argparse.ArgumentParser(
        prog="tools/plot_logs.py",
        description="Plot training logs and precision-recall curves of DETR-family runs (DETR, Deformable DETR, DINO).",
    )
    parser.add_argument("logs", nargs="*", help="log.txt files or output folders holding log.txt")
    parser.add_argument(
        "--fields",
        nargs="+",
        default=["loss", "class_error", "loss_bbox_unscaled", "AP"],
        help="X plots train_X and test_X; AP/AP50/AP75/APs/APm/APl/AR* read test_coco_eval_bbox; exact keys work",
    )
    parser.add_argument("--ewm_col", type=float, default=0, help="exponential smoothing centre of mass (0: none)")
    parser.add_argument("--log_name", default="log.txt", help="log file name inside output folders")
    parser.add_argument("--names", nargs="+", default=None, help="legend label per log")
    parser.add_argument("--output", default="training_curves.png", help="PNG for the training curves")
    parser.add_argument("--pr", nargs="+", default=[], help="evaluation results (.pth/.pt/.npz with 'precision')")
    parser.add_argument("--pr_output", default="precision_recall.png", help="PNG for the precision-recall curves")
    parser.add_argument("--naming_scheme", default="iter", choices=("iter", "exp_id"), help="legend label of --pr")
    return parser


def main(args: argparse.Namespace) -> list[Path]:
    """Write the requested PNGs and return their paths."""
    if not args.logs and not args.pr:
        raise SystemExit("nothing to plot: pass log.txt files/folders and/or --pr evaluation results")
    written = []
    try:
        if args.logs:
            plot_logs(
                args.logs,
                args.fields,
                ewm_col=args.ewm_col,
                log_name=args.log_name,
                output=args.output,
                names=args.names,
            )
            written.append(Path(args.output))
        if args.pr:
            plot_precision_recall(args.pr, naming_scheme=args.naming_scheme, output=args.pr_output)
            written.append(Path(args.pr_output))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(get_args_parser().parse_args())
