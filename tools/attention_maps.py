"""Attention of a trained detector: capture it with forward hooks and draw it.

DETR: the decoder's cross-attention of each object query over the feature map and the encoder's self-attention.
Deformable DETR / DINO have no dense cross-attention: each query samples a few points per head and level around
its reference (deformable attention), so the picture is those sampling points of the last decoder layer, sized
and coloured by their attention weights, plus the decoder self-attention among the queries.

The drawing half of ``tools/visualize_attention.py`` and ``predict.py --attention_maps``; it imports neither of
them (both import it), so the dependency runs one way. The weights come from forward hooks on the existing
modules, run with the 'math' kernel (the fused SDPA kernel does not expose them); both kernels give the same
predictions.
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

__all__ = [
    "AttentionMaps",
    "SamplingPoints",
    "capture_attention",
    "capture_sampling_points",
    "is_deformable",
    "parse_points",
    "save_attention_maps",
    "select_objects",
]


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


@dataclass
class SamplingPoints:
    """Deformable cross-attention of one image's last decoder layer (Deformable DETR, DINO).

    Attributes:
        locations: [Q, M, L, P, 2] where each query samples, per head M, level L and point P: (x, y) normalised
            to the image (0..1; the reference point plus the predicted offset).
        weights: [Q, M, L, P] attention weights of those samples (softmax over the L * P samples of each head).
        references: [Q, 2] the query's reference point (x, y) normalised (a box's centre for 4-d references).
        self_attention: [Q, Q] head-averaged decoder self-attention of the same layer (row = attending query).
        outputs: the model outputs ('pred_logits' [1, Q, K] sigmoid classes, 'pred_boxes' [1, Q, 4] cxcywh).
    """

    locations: Tensor
    weights: Tensor
    references: Tensor
    self_attention: Tensor | None
    outputs: dict[str, Tensor]


def _detector(model: nn.Module) -> nn.Module:
    """The DETR inside a segmentation wrapper (``DETRsegm.detr``), or the model itself."""
    return model.detr if hasattr(model, "detr") and hasattr(model.detr, "transformer") else model


def is_deformable(model: nn.Module) -> bool:
    """True for Deformable DETR / DINO (decoder layers with deformable ``cross_attn``), False for DETR."""
    return hasattr(_detector(model).transformer.decoder.layers[-1], "cross_attn")


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


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


@torch.no_grad()
def capture_sampling_points(model: nn.Module, image: Tensor, decoder_layer: int = -1) -> SamplingPoints:
    """Run a Deformable DETR / DINO on one normalised image and capture a decoder layer's sampling points.

    Hooks read the layer's ``cross_attn`` inputs (query [1, Q, C], valid-ratio scaled reference [1, Q, L, 2|4],
    level shapes) and the outputs of its ``sampling_offsets`` and ``attention_weights`` projections; the sampling
    locations follow the deformable-attention rule: reference + offset / (W_l, H_l) for 2-d references, centre
    + offset / P * (w, h) / 2 for boxes. One unpadded image: the valid ratios are 1, so a location normalised to
    a level is normalised to the image.

    Args:
        model: Deformable DETR or DINO in eval mode.
        image: ONE unbatched image [3, H, W], normalised as for evaluation, on the model's device.
        decoder_layer: which decoder layer (Python index, default the last).
    """
    layer = _detector(model).transformer.decoder.layers[decoder_layer]
    attention = layer.cross_attn
    captured: dict[str, object] = {}

    def keep_inputs(_module, args, kwargs):
        captured["reference"] = _argument(args, kwargs, 1, "reference_points")
        captured["shapes"] = _argument(args, kwargs, 3, "input_spatial_shapes")

    def keep(name: str):
        def hook(_module, _inputs, output):
            captured[name] = output[1] if isinstance(output, tuple) else output

        return hook

    handles = [
        attention.register_forward_pre_hook(keep_inputs, with_kwargs=True),
        attention.sampling_offsets.register_forward_hook(keep("offsets")),
        attention.attention_weights.register_forward_hook(keep("weights")),
        layer.self_attn.register_forward_hook(keep("self_attention")),
    ]
    try:
        with _math_kernel(model):
            outputs = model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    reference = captured["reference"][0].float()  # [Q, L, 2|4]
    queries = reference.shape[0]
    offsets = captured["offsets"][0].float().view(queries, heads, levels, points, 2)
    weights = captured["weights"][0].float().view(queries, heads, levels * points).softmax(-1)
    ref = reference[:, None, :, None, :]  # [Q, 1, L, 1, 2|4]
    if reference.shape[-1] == 2:
        shapes = torch.as_tensor(captured["shapes"], dtype=torch.float32, device=offsets.device).view(-1, 2)
        locations = ref + offsets / shapes.flip(-1)[:, None, :]
    else:
        locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
    self_attention = captured.get("self_attention")
    return SamplingPoints(
        locations=locations.cpu(),
        weights=weights.view(queries, heads, levels, points).cpu(),
        references=reference[:, 0, :2].cpu(),
        self_attention=None if self_attention is None else self_attention[0].float().cpu(),
        outputs={k: v for k, v in outputs.items() if isinstance(v, Tensor)},
    )


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
    outputs: Mapping[str, Tensor],
    size: tuple[int, int],
    threshold: float,
    max_objects: int,
    focal: bool = False,
    class_ids: Sequence[int] | None = None,
) -> list[tuple[int, int, float, list[float]]]:
    """Queries to show: (query, label, score, x0y0x1y1 box in pixels) above ``threshold``, best first.

    Scores as the model's postprocessor: softmax over K + 1 without "no object" (DETR), or with ``focal`` the
    sigmoid over K classes (Deformable DETR, DINO), each query with its best class. ``class_ids``: the only
    classes reported (the dataset's categories). When no query passes the threshold the single best one is
    shown, so a figure is never empty.
    """
    logits = outputs["pred_logits"][0].float()
    probs = logits.sigmoid() if focal else logits.softmax(-1)[:, :-1]
    if class_ids is not None:
        allowed = torch.zeros(probs.shape[-1], dtype=torch.bool)
        allowed[list(class_ids)] = True
        probs = probs.masked_fill(~allowed, -1.0)  # below every probability: never the best class
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


def _draw_sampling_points(
    fig: Figure, image: Image.Image, maps: SamplingPoints, objects: list, names: Mapping[int, str]
) -> None:
    """Per object: its sampling points over the image (colour = level, area = weight) and its self-attention."""
    axes = fig.subplots(2, len(objects), squeeze=False)
    width, height = image.size
    levels = maps.locations.shape[2]
    colors = [f"C{level % 10}" for level in range(levels)]
    centres = box_cxcywh_to_xyxy(maps.outputs["pred_boxes"][0].float().cpu())
    centres = ((centres[:, :2] + centres[:, 2:]) / 2) * torch.tensor([width, height])
    for column, (query, label, score, (x0, y0, x1, y1)) in enumerate(objects):
        ax = axes[0, column]
        ax.set_axis_off()
        ax.imshow(image)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", linewidth=1))
        for level in range(levels):
            xy = maps.locations[query, :, level].reshape(-1, 2) * torch.tensor([width, height])
            area = maps.weights[query, :, level].reshape(-1) * 300  # a head's weights sum to 1 over L * P samples
            ax.scatter(xy[:, 0], xy[:, 1], s=area, color=colors[level], alpha=0.8, label=f"level {level}")
        rx, ry = (maps.references[query] * torch.tensor([width, height])).tolist()
        ax.plot([rx], [ry], "+", color="red", markersize=10)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(f"query {query}: {class_name(names, label)} {score:.2f}", fontsize=9)
        if column == 0:
            ax.legend(fontsize=6, loc="lower left", markerscale=0.5)
        ax = axes[1, column]
        ax.set_axis_off()
        ax.imshow(image)
        if maps.self_attention is not None:
            row = maps.self_attention[query]
            ax.scatter(centres[:, 0], centres[:, 1], c=row.numpy(), s=20 + 300 * row / row.max(), cmap="viridis")
            ax.set_title(f"self-attention of query {query} (box centres)", fontsize=8)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)


def save_attention_maps(
    model: nn.Module,
    image: Image.Image,
    output: str | Path,
    threshold: float = 0.7,
    input_scale: float = 1.0,
    names: Mapping[int, str] | None = None,
    points: Sequence[str] | Sequence[tuple[float, float]] | None = None,
    max_objects: int = 6,
    class_ids: Sequence[int] | None = None,
) -> Path:
    """Write a PNG of where each detected object's query looks.

    DETR: per object its decoder attention and box, and the encoder self-attention at ``points``. Deformable
    DETR / DINO: per object the last decoder layer's sampling points (all heads and levels; colour = level, area
    = attention weight, red + = reference point) over the image, and its decoder self-attention over the other
    queries (drawn at their predicted box centres); ``points`` is not used (the encoder attention is deformable
    too).

    Args:
        model: DETR/DETRsegm, Deformable DETR or DINO in eval mode (its device is used).
        image: the original RGB image.
        output: PNG path.
        threshold: detections to show (see :func:`select_objects`).
        input_scale: the model's --input_scale (evaluation resize).
        names: category id -> name.
        points: (x, y) or "x,y" in original pixels; default the centres of the shown boxes.
        max_objects: at most this many objects.
        class_ids: the only classes shown (the dataset's categories); None: all.
    """
    device = next(model.parameters()).device
    tensor = _eval_transform(float(input_scale))(image, None)[0].to(device)
    deformable = is_deformable(model)
    maps = capture_sampling_points(model, tensor) if deformable else capture_attention(model, tensor)
    objects = select_objects(
        {k: v.cpu() for k, v in maps.outputs.items()},
        (image.height, image.width),
        threshold,
        max_objects,
        focal=deformable,
        class_ids=class_ids,
    )
    names = names or {}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(maps, SamplingPoints):
        fig = Figure(figsize=(3 * len(objects), 6), layout="constrained")
        _draw_sampling_points(fig, image, maps, objects, names)
        fig.savefig(output, dpi=80)
        return output
    if points and isinstance(points[0], str):
        points = parse_points(points)  # type: ignore[arg-type]
    if not points:
        points = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for _, _, _, b in objects[:4]]
    points = [(min(max(x, 0), image.width - 1), min(max(y, 0), image.height - 1)) for x, y in points]

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
    fig.savefig(output, dpi=80)
    return output
