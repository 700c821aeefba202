"""Run a trained detector of any family (DETR, Deformable DETR, DINO, ...) on images: COCO-results JSON and PNGs
with the detections drawn.

Examples:
    python predict.py --checkpoint outputs/checkpoint.pth images/ extra/*.jpg --output_dir predictions
    python predict.py --checkpoint https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth photo.jpg \
        --threshold 0.9 --attention_maps

The model is rebuilt from the checkpoint alone (``run.model_loading``): its family (``--model``, stored in the
checkpoint or told by its keys through the families' ``owns_state_dict``), its stored training arguments (missing
ones take that family's defaults of ``main.get_args_parser``) and the architecture read from the state-dict
shapes, so any checkpoint of this project or a published one loads with strict=True.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from models.deploy import prepare_for_inference
from run.checkpoint import CheckpointError
from run.model_loading import input_transform, labels_are_indices, load_model
from util.class_names import category_ids, class_name, resolve_class_names
from util.misc import nested_tensor_from_tensor_list

THRESHOLD_HELP = (
    "keep detections with a score above this, in [0, 1) (default 0.7). DETR: one detection per query, the softmax "
    "probability of its best class (the 'no object' class takes the rest). Deformable DETR / DINO: the top "
    "--num_select (query, class) pairs by sigmoid probability (no 'no object' class; one query may give several "
    "classes), so a low threshold lists many weak pairs. Only the checkpoint's categories (its stored class names "
    "or --categories) are ever reported; a checkpoint without them reports every class id"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------- images


def find_images(inputs: Iterable[str]) -> list[Path]:
    """Expand files, folders (recursively, image suffixes only) and glob patterns; keep order, drop duplicates."""
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"{item}: no image file, folder or glob match")
        found.update(dict.fromkeys(matches))
    return list(found)


@functools.lru_cache(maxsize=4)
def _val_transform(input_scale: float):
    from datasets.coco import make_coco_transforms

    return make_coco_transforms("val", input_scale=input_scale)


def eval_transform(image: Image.Image, input_scale: float = 1.0) -> Tensor:
    """PIL RGB image -> normalised [3, H, W] float tensor at the evaluation size.

    The published evaluation resize (short side 800, long side <= 1333, both times ``input_scale``) and
    ImageNet normalisation, via ``datasets.coco.make_coco_transforms('val')``.
    """
    return _val_transform(float(input_scale))(image, None)[0]


def check_device(name: str | None) -> str:
    """``--device`` as a torch device string: None picks cuda when available, else cpu.

    Raises:
        ValueError: an explicit device this machine lacks (one line saying what to pass instead).
    """
    from run.distributed import DeviceError, select_device

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(select_device(name, explicit=True))
    except DeviceError as err:
        raise ValueError(str(err)) from None


def open_rgb(path: Path) -> Image.Image:
    """Open ``path`` as RGB, with a clear error for unreadable files."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{path}: cannot read the image ({err}); remove it or fix the file") from None


# ---------------------------------------------------------------------------------------- prediction


def restrict_to_classes(
    outputs: Mapping[str, Tensor], detections: list[dict[str, Tensor]] | None, class_ids: Sequence[int]
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """Keep only the classes ``class_ids`` (the dataset's categories).

    With ``detections`` None: a copy of ``outputs`` whose sigmoid logits [B, Q, K] (Deformable DETR, DINO) are
    -inf outside ``class_ids``, so the top-k (query, class) selection only spends its slots on categories.
    With ``detections`` (per image 'scores', 'labels', 'boxes'): those whose label is in ``class_ids``.
    """
    if detections is None:
        logits = outputs["pred_logits"]
        blocked = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        blocked[list(class_ids)] = False
        return {**outputs, "pred_logits": logits.masked_fill(blocked, float("-inf"))}
    allowed = torch.tensor(sorted(class_ids))
    return [{k: v[torch.isin(d["labels"], allowed)] for k, v in d.items()} for d in detections]


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    postprocessor: nn.Module,
    images: Sequence[Image.Image],
    device: str,
    input_scale: float = 1.0,
    class_ids: Sequence[int] | None = None,
    transform: Callable | None = None,
) -> list[dict[str, Tensor]]:
    """Detections for PIL images: per image 'scores' [N], 'labels' [N], 'boxes' [N, 4] x0y0x1y1 in original pixels.

    ``class_ids``: the categories of the model's dataset (``util.class_names.category_ids``); other class ids are
    never returned. None keeps every id (published checkpoints name no categories).
    """
    from models.postprocess import PostProcessTopK

    if transform is not None:  # the family's own eval pipeline (e.g. RT-DETRv2: 640 x 640, no mean/std)
        tensors = [transform(image, None)[0].to(device) for image in images]
    else:
        tensors = [eval_transform(image, input_scale).to(device) for image in images]
    outputs = model(nested_tensor_from_tensor_list(tensors))
    if class_ids is not None and isinstance(postprocessor, PostProcessTopK):
        outputs = restrict_to_classes(outputs, None, class_ids)
    sizes = torch.tensor([[image.height, image.width] for image in images], device=device)
    detections = [{k: v.cpu() for k, v in r.items()} for r in postprocessor(outputs, sizes)]
    # DETR's softmax is over all K + 1 logits, so its non-category ids are dropped after the fact, not masked;
    # the top-k may also pick masked (score 0) pairs when there are fewer category pairs than slots.
    return detections if class_ids is None else restrict_to_classes(outputs, detections, class_ids)


def to_coco_results(image_id: int, file_name: str, detections: Mapping[str, Tensor], names: Mapping) -> list[dict]:
    """COCO results entries (bbox as x, y, width, height in pixels) for one image's kept detections."""
    entries = []
    for score, label, (x0, y0, x1, y1) in zip(
        detections["scores"].tolist(), detections["labels"].tolist(), detections["boxes"].tolist()
    ):
        entries.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "category_id": int(label),
                "category_name": class_name(names, label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": score,
            }
        )
    return entries


def label_font_size(width: int, height: int) -> int:
    """Label font size in pixels for a ``width`` x ``height`` image: 1/30 of the short side, 8 to 40."""
    return int(min(max(round(min(width, height) / 30), 8), 40))


def label_position(text_size: tuple[int, int], box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a ``text_size`` (w, h) label for ``box`` (x0y0x1y1): above the box, or inside its top
    edge when there is no room above; always inside the ``image_size`` (w, h) image."""
    (text_w, text_h), (width, height) = text_size, image_size
    x0, y0 = box[0], box[1]
    y = y0 - text_h if y0 - text_h >= 0 else y0
    x = min(max(x0, 0), max(width - text_w, 0))
    return int(x), int(min(max(y, 0), max(height - text_h, 0)))


def draw_detections(image: Image.Image, detections: Mapping[str, Tensor], names: Mapping) -> Tensor:
    """uint8 [3, H, W] image with boxes, class names and scores drawn (one colour per class).

    The font scales with the image (`label_font_size`) and every label stays inside it (`label_position`).
    """
    canvas = TF.pil_to_tensor(image)
    if len(detections["boxes"]) == 0:
        return canvas
    labels = [f"{class_name(names, lab)} {s:.2f}" for lab, s in zip(detections["labels"], detections["scores"])]
    palette = ["red", "lime", "blue", "yellow", "cyan", "magenta", "orange", "white"]
    colors = [palette[int(lab) % len(palette)] for lab in detections["labels"]]
    width = max(1, round(min(image.size) / 200))
    drawn = TF.to_pil_image(draw_bounding_boxes(canvas, detections["boxes"], colors=colors, width=width))
    draw = ImageDraw.Draw(drawn)
    font = ImageFont.load_default(size=label_font_size(*image.size))
    for text, color, box in zip(labels, colors, detections["boxes"].tolist()):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = label_position((right - left, bottom - top), box, image.size)
        draw.rectangle((x, y, x + right - left, y + bottom - top), fill=color)
        draw.text((x - left, y - top), text, fill="black", font=font)
    return TF.pil_to_tensor(drawn)


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names: the file stem, suffixed _1, _2 ... when several inputs share it."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


def run(args: argparse.Namespace) -> list[dict]:
    """Predict on every input image; write predictions.json (and PNGs) into args.output_dir; return the results.

    predictions.json is written before any attention map is drawn, so a failing drawing never loses it.
    """
    images = find_images(args.inputs)
    model, postprocessors, model_args, checkpoint = load_model(args.checkpoint, device=args.device)
    # Detections come from the inference copy (folded norms, fused blocks, channels_last); attention maps hook
    # the modules of the model as trained.
    inference_model = prepare_for_inference(model)
    names = resolve_class_names(checkpoint, model_args.num_classes, args.categories)
    # Labels that are indices of the dataset's categories are all categories (reported as their ids).
    class_ids = None if labels_are_indices(model_args) else category_ids(checkpoint, model_args.num_classes,
                                                                         args.categories)  # fmt: skip
    transform = input_transform(model_args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(images)
    results: list[dict] = []
    progress = tqdm(total=len(images), desc="predict", unit="img", disable=args.no_progress)
    for start in range(0, len(images), args.batch_size):
        paths = images[start : start + args.batch_size]
        pil_images = [open_rgb(p) for p in paths]
        batch = predict_batch(
            inference_model, postprocessors["bbox"], pil_images, args.device, model_args.input_scale,
            class_ids=class_ids, transform=transform,
        )  # fmt: skip
        for offset, (path, image, detections) in enumerate(zip(paths, pil_images, batch)):
            keep = detections["scores"] > args.threshold
            kept = {k: v[keep] for k, v in detections.items()}
            image_id = start + offset
            results.extend(to_coco_results(image_id, str(path), kept, names))
            if not args.no_images:
                drawn = draw_detections(image, kept, names)
                TF.to_pil_image(drawn).save(output_dir / f"{stems[image_id]}.png")
        progress.update(len(paths))
    progress.close()
    json_path = output_dir / "predictions.json"
    json_path.write_text(json.dumps(results, indent=1))
    print(f"{len(results)} detections above {args.threshold} in {len(images)} images -> {json_path}")
    if args.attention_maps:
        _draw_attention(args, model, model_args, images, stems, names, class_ids, json_path)
    return results


def _draw_attention(args, model, model_args, images, stems, names, class_ids, json_path: Path) -> None:
    """<stem>_attention.png per image; a failure ends the run in one line that says the predictions were kept."""
    from tools.attention_maps import save_attention_maps

    output_dir = Path(args.output_dir)
    for path, stem in zip(images, stems):
        try:
            save_attention_maps(
                model,
                open_rgb(path),
                output_dir / f"{stem}_attention.png",
                threshold=args.threshold,
                input_scale=model_args.input_scale,
                names=names,
                points=args.encoder_points,
                class_ids=class_ids,
            )
        except Exception as err:  # noqa: BLE001 - any drawing failure: the predictions are already on disk
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise SystemExit(
                f"error: attention maps failed on {path} ({type(err).__name__}: {message}); "
                f"the predictions were written to {json_path}"
            ) from None


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of predict.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--checkpoint", required=True, help="trained checkpoint: path or https URL")
    parser.add_argument("--output_dir", default="predictions", help="where predictions.json and the PNGs go")
    parser.add_argument("--threshold", type=float, default=0.7, help=THRESHOLD_HELP)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: cuda when available)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--categories", default=None, help="JSON with category names (COCO annotation file or list)")
    parser.add_argument("--no_images", action="store_true", help="write predictions.json only")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--attention_maps",
        action="store_true",
        help="also write <image>_attention.png: decoder attention per detection and encoder self-attention",
    )
    parser.add_argument(
        "--encoder_points",
        nargs="+",
        default=None,
        metavar="X,Y",
        help="image pixels whose encoder self-attention to show (default: the detected box centres)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Entry point; bad input exits with a one-line error."""
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("error: --batch_size must be at least 1")
    if not 0.0 <= args.threshold < 1.0:
        raise SystemExit(f"error: --threshold must be in [0, 1), got {args.threshold}")
    try:
        args.device = check_device(args.device)
        return run(args)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
