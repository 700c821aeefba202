"""Attention of a trained DETR, Deformable DETR or DINO per detected object, one PNG per image.

DETR: decoder cross-attention per detected object and encoder self-attention at points. Deformable DETR / DINO:
the last decoder layer's deformable sampling points per detected object (sized by attention weight, coloured by
level) and its decoder self-attention.

Example:
    python tools/visualize_attention.py --checkpoint runs/demo/checkpoint.pth photo.jpg --points 320,240 100,80
    # -> runs/demo/attention/photo_attention.png (default: an 'attention' folder next to the checkpoint)

Also available as ``python predict.py ... --attention_maps``. The capture and drawing live in
``tools/attention_maps.py`` (re-exported here); this file is the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from predict import check_device, find_images, open_rgb  # noqa: E402
from run.checkpoint import CheckpointError  # noqa: E402
from run.model_loading import load_model  # noqa: E402
from tools.attention_maps import (  # noqa: E402, F401 - the public names of this tool
    AttentionMaps,
    SamplingPoints,
    capture_attention,
    capture_sampling_points,
    parse_points,
    save_attention_maps,
    select_objects,
)
from util.class_names import category_ids, resolve_class_names  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of this tool."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", required=True, help="trained checkpoint: path or https URL")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where <image>_attention.png files go (default: 'attention' next to a local --checkpoint; required "
        "for a URL)",
    )
    parser.add_argument("--threshold", type=float, default=0.7, help="show detections above this score")
    parser.add_argument(
        "--points", nargs="+", default=None, metavar="X,Y", help="encoder self-attention points (DETR only)"
    )
    parser.add_argument("--max_objects", type=int, default=6)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: cuda when available)")
    parser.add_argument("--categories", default=None, help="JSON with category names (default: the checkpoint's)")
    return parser


def default_output_dir(checkpoint: str) -> Path:
    """``attention`` beside a local checkpoint (never the working directory by default); a URL has no folder.

    Raises:
        ValueError: ``checkpoint`` is a URL (then ``--output_dir`` is needed).
    """
    if "://" in checkpoint:
        raise ValueError(f"--checkpoint {checkpoint} is a URL: pass --output_dir for the attention PNGs")
    return Path(checkpoint).expanduser().resolve().parent / "attention"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write one attention PNG per input image; bad input exits with a one-line error."""
    args = get_args_parser().parse_args(argv)
    try:
        args.device = check_device(args.device)
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.checkpoint)
        images = find_images(args.inputs)
        model, _, model_args, checkpoint = load_model(args.checkpoint, device=args.device)
        names = resolve_class_names(checkpoint, model_args.num_classes, args.categories)
        class_ids = category_ids(checkpoint, model_args.num_classes, args.categories)
        points = parse_points(args.points)
        written = []
        for path in images:
            out = output_dir / f"{path.stem}_attention.png"
            written.append(
                save_attention_maps(
                    model,
                    open_rgb(path),
                    out,
                    args.threshold,
                    model_args.input_scale,
                    names,
                    points,
                    args.max_objects,
                    class_ids,
                )
            )
            print(f"wrote {out}")
        return written
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
