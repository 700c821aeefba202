"""Attention maps of a trained DETR: capture the decoder/encoder attention weights and draw them.

The drawing half of ``tools/visualize_attention.py`` and ``predict.py --attention_maps``; it imports neither of
them (both import it), so the dependency runs one way. The weights come from forward hooks on the transformer's
attention modules, run with the 'math' kernel (the fused SDPA kernel does not expose them); both kernels give
the same predictions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy
from util.class_names import class_name

__all__ = ["AttentionMaps", "capture_attention", "parse_points", "save_attention_maps", "select_objects"]


@functools.lru_cache(maxsize=4)
def _eval_transform(input_scale: float):
    from datasets.coco import make_coco_transforms  # the published evaluation resize + normalisation

    return make_coco_transforms("val", input_scale=input_scale)


@dataclass
class AttentionMaps:
    """Attention of one image, head-averaged.

    Attributes:
        decoder: [Q, h, w] cross-attention of each object query over the encoder feature map.
        encoder: [h, w, h, w] self-attention: ``encoder[i, j]`` is where feature cell (i, j) looks; None
            without encoder layers.
        outputs: the model outputs ('pred_logits' [1, Q, K+1], 'pred_boxes' [1, Q, 4] cxcywh normalised).
    """

    decoder: Tensor
    encoder: Tensor | None
    outputs: dict[str, Tensor]


def _detector(model: nn.Module) -> nn.Module:
    """The DETR inside a segmentation wrapper (``DETRsegm.detr``), or the model itself."""
    return model.detr if hasattr(model, "detr") and hasattr(model.detr, "transformer") else model


@contextlib.contextmanager
def _math_kernel(model: nn.Module) -> Iterator[None]:
    """Run every attention module with the 'math' kernel (which returns weights), then restore the kernels."""
    modules = [m for m in model.modules() if hasattr(m, "kernel") and hasattr(m, "in_proj_weight")]
    previous = [m.kernel for m in modules]
    for module in modules:
        module.kernel = "math"
    try:
        yield
    finally:
        for module, kernel in zip(modules, previous):
            module.kernel = kernel


@torch.no_grad()
def capture_attention(
    model: nn.Module, image: Tensor, decoder_layer: int = -1, encoder_layer: int = -1
) -> AttentionMaps:
    """Run ``model`` on one normalised image and capture its attention weights (head-averaged).

    Args:
        model: DETR or DETRsegm in eval mode.
        image: ONE unbatched image [3, H, W], normalised as for evaluation (``predict.eval_transform``), on the
            model's device; no padding, so every feature cell is real.
        decoder_layer / encoder_layer: which layer's attention (Python index, default the last).

    Returns:
        AttentionMaps with ``.decoder`` [Q, h, w] (each query's cross-attention over the h x w feature map),
        ``.encoder`` [h, w, h, w] (where each feature cell looks; None without encoder layers) and ``.outputs``
        (the model's 'pred_logits' [1, Q, K+1] and 'pred_boxes' [1, Q, 4], cxcywh normalised), all on the CPU
        except ``.outputs``.
    """
    detr = _detector(model)
    transformer = detr.transformer
    captured: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            captured[name] = output[1] if isinstance(output, tuple) else output

        return hook

    handles = [
        detr.input_proj.register_forward_hook(keep("features")),
        transformer.decoder.layers[decoder_layer].multihead_attn.register_forward_hook(keep("decoder")),
    ]
    if len(transformer.encoder.layers):
        handles.append(transformer.encoder.layers[encoder_layer].self_attn.register_forward_hook(keep("encoder")))
    try:
        with _math_kernel(model):
            outputs = model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    height, width = captured["features"].shape[-2:]
    decoder = captured["decoder"][0].reshape(-1, height, width)
    encoder = captured.get("encoder")
    if encoder is not None:
        encoder = encoder[0].reshape(height, width, height, width)
    outputs = {k: v for k, v in outputs.items() if isinstance(v, Tensor)}
    return AttentionMaps(decoder=decoder.cpu(), encoder=None if encoder is None else encoder.cpu(), outputs=outputs)


def parse_points(points: Sequence[str] | None) -> list[tuple[float, float]]:
    """``["x,y", ...]`` in image pixels -> [(x, y), ...] with a clear error for bad entries."""
    parsed = []
    for text in points or []:
        try:
            x, y = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"--points/--encoder_points entry {text!r}: expected X,Y in image pixels") from None
        parsed.append((x, y))
    return parsed


def select_objects(
    outputs: Mapping[str, Tensor], size: tuple[int, int], threshold: float, max_objects: int
) -> list[tuple[int, int, float, list[float]]]:
    """Queries to show: (query, label, score, x0y0x1y1 box in pixels) above ``threshold``, best first.

    When no query passes the threshold the single best one is shown, so a figure is never empty.
    """
    probs = outputs["pred_logits"][0].float().softmax(-1)[:, :-1]
    scores, labels = probs.max(-1)
    height, width = size
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][0].float()) * torch.tensor([width, height, width, height])
    order = scores.argsort(descending=True)
    chosen = [q for q in order.tolist() if scores[q] > threshold][:max_objects] or order[:1].tolist()
    return [(q, int(labels[q]), float(scores[q]), boxes[q].tolist()) for q in chosen]


def _show_map(ax, image: Image.Image, attention: Tensor) -> None:
    ax.imshow(image)
    ax.imshow(attention.numpy(), extent=(0, image.width, image.height, 0), alpha=0.6, cmap="viridis")
    ax.set_axis_off()


def save_attention_maps(
    model: nn.Module,
    image: Image.Image,
    output: str | Path,
    threshold: float = 0.7,
    input_scale: float = 1.0,
    names: Mapping[int, str] | None = None,
    points: Sequence[str] | Sequence[tuple[float, float]] | None = None,
    max_objects: int = 6,
) -> Path:
    """Write a PNG: per detected object its decoder attention and box; encoder self-attention at ``points``.

    Args:
        model: DETR/DETRsegm in eval mode (its device is used).
        image: the original RGB image.
        output: PNG path.
        threshold: detections to show (see :func:`select_objects`).
        input_scale: the model's --input_scale (evaluation resize).
        names: category id -> name.
        points: (x, y) or "x,y" in original pixels; default the centres of the shown boxes.
        max_objects: at most this many objects.
    """
    device = next(model.parameters()).device
    maps = capture_attention(model, _eval_transform(float(input_scale))(image, None)[0].to(device))
    objects = select_objects(
        {k: v.cpu() for k, v in maps.outputs.items()}, (image.height, image.width), threshold, max_objects
    )
    if points and isinstance(points[0], str):
        points = parse_points(points)  # type: ignore[arg-type]
    if not points:
        points = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for _, _, _, b in objects[:4]]
    points = [(min(max(x, 0), image.width - 1), min(max(y, 0), image.height - 1)) for x, y in points]
    names = names or {}

    show_encoder = maps.encoder is not None
    columns = max(len(objects), len(points) + 1 if show_encoder else 1)
    rows = 3 if show_encoder else 2
    fig = Figure(figsize=(3 * columns, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for column, (query, label, score, (x0, y0, x1, y1)) in enumerate(objects):
        _show_map(axes[0, column], image, maps.decoder[query])
        axes[0, column].set_title(f"query {query} attention", fontsize=9)
        ax = axes[1, column]
        ax.imshow(image)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", linewidth=2))
        ax.set_title(f"{class_name(names, label)} {score:.2f}", fontsize=9)
    if show_encoder:
        height, width = maps.decoder.shape[-2:]
        ax = axes[2, 0]
        ax.imshow(image)
        for index, (x, y) in enumerate(points):
            ax.plot([x], [y], "o", color="red", markersize=6)
            ax.annotate(str(index), (x, y), color="white", fontsize=9)
        ax.set_title("encoder points", fontsize=9)
        for index, (x, y) in enumerate(points, start=1):
            row = min(int(y / image.height * height), height - 1)
            col = min(int(x / image.width * width), width - 1)
            _show_map(axes[2, index], image, maps.encoder[row, col])
            axes[2, index].set_title(f"self-attention at point {index - 1}", fontsize=9)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=80)
    return output
