"""Convert between HF transformers model folders and this project's checkpoints (DETR, DETR panoptic, Deformable DETR,
RT-DETRv2).

Examples:
    python tools/convert_hf.py to-project hf/detr-resnet-50 detr-r50-hf.pth
    python main.py --finetune detr-r50-hf.pth ...          # or --resume / predict.py --checkpoint
    python tools/convert_hf.py from-project outputs/checkpoint.pth hf/my-detr
    # then: transformers.pipeline("object-detection", model="hf/my-detr")

``to-project`` reads a ``save_pretrained`` folder (config.json + model.safetensors; DETR / Deformable DETR with the
timm ResNet backbone as in the published HF checkpoints, RT-DETRv2 with its ResNet-vd) and writes a checkpoint with
'model' (the published keys of the family), 'args' (every flag that rebuilds the model) and 'class_names' (from
``id2label``). ``from-project`` writes config.json,
model.safetensors and preprocessor_config.json. Both check that every tensor has its place; ``--check`` also
rebuilds the converted model and loads the weights strictly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interop.hf_detr import MappingError  # noqa: E402
from interop.hf_folder import checkpoint_to_hf_folder, hf_folder_to_checkpoint  # noqa: E402
from run.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools/convert_hf.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-project", help="HF folder -> this project's checkpoint (.pth)")
    to.add_argument("hf_folder", help="folder with config.json and model.safetensors")
    to.add_argument("output", help="checkpoint file to write")
    to.add_argument("--check", action="store_true", help="rebuild the model and load the weights strictly")
    back = sub.add_parser("from-project", help="this project's checkpoint -> HF folder")
    back.add_argument("checkpoint", help="checkpoint file (.pth) of DETR, DETR --masks, Deformable DETR or RT-DETRv2")
    back.add_argument("hf_folder", help="folder to write (created; existing files of the same names are replaced)")
    back.add_argument("--check", action="store_true", help="load the folder with transformers' from_pretrained")
    return parser


def check_checkpoint(checkpoint: dict) -> None:
    """Build the checkpoint's model from its stored 'args' and load its weights with strict=True."""
    from models import build_model

    args = argparse.Namespace(**checkpoint["args"])
    args.device = "cpu"
    model, _, _ = build_model(args)
    model.load_state_dict(checkpoint["model"], strict=True)


def check_hf_folder(folder: Path) -> None:
    """Load ``folder`` with transformers; any missing or unexpected weight is an error."""
    import transformers

    model_class = {"DetrForSegmentation": transformers.DetrForSegmentation,
                   "DetrForObjectDetection": transformers.DetrForObjectDetection,
                   "DeformableDetrForObjectDetection": transformers.DeformableDetrForObjectDetection,
                   "RTDetrV2ForObjectDetection": transformers.RTDetrV2ForObjectDetection}  # fmt: skip
    name = transformers.AutoConfig.from_pretrained(folder).architectures[0]
    _, info = model_class[name].from_pretrained(folder, output_loading_info=True)
    wrong = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if wrong or info.get("error_msgs"):
        raise MappingError(f"{folder}: transformers loads it with {wrong or info['error_msgs']}")


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        if args.direction == "to-project":
            checkpoint = hf_folder_to_checkpoint(args.hf_folder)
            if args.check:
                check_checkpoint(checkpoint)
            save_checkpoint(checkpoint, args.output)
            print(f"wrote {args.output} (--model {checkpoint['args']['model']}, {len(checkpoint['model'])} tensors)")
        else:
            checkpoint = load_checkpoint(args.checkpoint, hint="check the checkpoint path")
            folder = checkpoint_to_hf_folder(checkpoint, args.hf_folder)
            if args.check:
                check_hf_folder(folder)
            print(f"wrote {folder} (config.json, model.safetensors, preprocessor_config.json)")
    except (MappingError, CheckpointError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"tools/convert_hf.py: {err}") from None


if __name__ == "__main__":
    main()
