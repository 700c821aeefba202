"""Export a trained detector (any family) to ONNX (fixed or dynamic image sizes) and check it against PyTorch with
onnxruntime.

Examples:
    python tools/export_onnx.py --checkpoint outputs/checkpoint.pth --output model.onnx --height 800 --width 1066
    python tools/export_onnx.py --checkpoint outputs/checkpoint.pth --output model.onnx --dynamic --with_mask --check

The graph is traced from the inference copy of ``models.deploy.prepare_for_inference`` (batch norms folded into
their convolutions, RT-DETR's RepVGG branches merged, as the published export's ``deploy()``); ``--check`` compares
it with the unprepared model.

The ONNX graph takes ``images`` [B, 3, H, W] (normalised with the ImageNet mean/std, as predict.py does) and,
with ``--with_mask``, ``mask`` [B, H, W] bool (True on padding, for batches of different sizes); it returns
``pred_logits`` [B, Q, K+1] and ``pred_boxes`` [B, Q, 4] (cx, cy, w, h normalised to each unpadded image).
Segmentation models export their detector. The default exporter is torch's TorchScript-based one, which
needs nothing beyond onnx; ``--exporter dynamo`` uses the torch.export-based one (needs onnxscript) and writes
opset 18 or later (its Split nodes carry ``num_outputs``, an opset-18 attribute). Every written file is checked
with ``onnx.checker``. For a ``torch.export`` program (.pt2) see tools/export.py.

Deformable DETR and DINO export the same way (the deformable attention through ``GridSample``, opset >= 16), with
dynamic sizes too. DINO (and two-stage Deformable DETR) select their ``num_queries`` queries among the encoder
tokens (one per feature cell of every level, about H * W / 48 for 4 scales). PyTorch takes every token when an
image has fewer, but a graph keeps one top-k, so the export size and every image given to the graph need at least
that many tokens (900 for the published DINO: about 210 x 210 pixels and up). With ``--check``, a graph that
onnxruntime cannot run or whose outputs differ by more than ``--tolerance`` ends the tool with one error line.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.deploy import prepare_for_inference  # noqa: E402
from util.misc import NestedTensor  # noqa: E402

INPUT_NAMES = ("images", "mask")
# Default opset per exporter: 17 for the TorchScript-based one; the dynamo exporter needs at least 18.
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class ExportableDETR(nn.Module):
    """Tensor-in, tensor-out view of a DETR for tracing.

    Args:
        model: DETR, or DETRsegm (its ``detr`` is exported: boxes and classes only).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.detr = model.detr if hasattr(model, "detr") and hasattr(model.detr, "transformer") else model

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] bool (True on padding; None: no padding) -> (logits, boxes)."""
        if mask is None:
            mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        outputs = self.detr(NestedTensor(images, mask))
        return outputs["pred_logits"], outputs["pred_boxes"]


@contextlib.contextmanager
def _final_layer_only(detr: nn.Module) -> Iterator[None]:
    """Skip the auxiliary decoder outputs while exporting (they are not graph outputs), then restore."""
    previous = getattr(detr, "aux_loss", False)
    detr.aux_loss = False
    try:
        yield
    finally:
        detr.aux_loss = previous


def export_onnx(
    model: nn.Module,
    output: str | Path,
    height: int = 800,
    width: int = 1066,
    batch_size: int = 1,
    dynamic: bool = False,
    with_mask: bool = False,
    opset: int | None = None,
    exporter: str = "torchscript",
    prepare: bool = True,
) -> Path:
    """Write ``model`` as ONNX.

    Args:
        model: DETR/DETRsegm (set to eval mode here; on the device of its parameters).
        output: .onnx path.
        height, width, batch_size: the example input size (the only accepted size unless ``dynamic``).
        dynamic: make batch, height and width symbolic.
        with_mask: add the ``mask`` input; without it every image is taken as unpadded.
        opset: ONNX opset; default 17 for 'torchscript' (>= 14 for scaled_dot_product_attention), 18 for 'dynamo'
            (its minimum: at 17 it writes Split nodes that are invalid there).
        exporter: 'torchscript' (default, no extra dependency) or 'dynamo' (needs onnxscript).
        prepare: trace ``prepare_for_inference(model)`` (folded norms, fused blocks; contiguous weights, ONNX has no
            memory format) instead of the model itself; ``model`` is not modified either way.

    Returns:
        The written path.
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"--exporter {exporter}: expected 'torchscript' or 'dynamo'")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError(
                "--exporter dynamo needs onnxscript: pip install onnxscript (or use torchscript)"
            ) from None
    if opset is None:
        opset = DEFAULT_OPSET[exporter]
    if exporter == "dynamo" and opset < DEFAULT_OPSET["dynamo"]:
        raise ValueError(f"--exporter dynamo writes opset 18 or later (got --opset {opset}; Split needs opset 18)")
    from tools.export import check_fixed_size, fixed_input_size

    check_fixed_size(model, height, width)
    fixed = fixed_input_size(model) is not None  # per-size buffers in the graph: only the batch is symbolic
    if prepare:
        model = prepare_for_inference(model, channels_last=False)
    wrapper = ExportableDETR(model).eval()
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, height, width, device=device)
    inputs: tuple[Tensor, ...] = (images,)
    if with_mask:
        inputs += (torch.zeros(batch_size, height, width, dtype=torch.bool, device=device),)
    names = list(INPUT_NAMES[: len(inputs)])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {"input_names": names, "output_names": list(OUTPUT_NAMES), "opset_version": opset}
    if exporter == "torchscript":
        kwargs["dynamo"] = False
        if dynamic:
            axes = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"}}
            if fixed:
                axes = {"images": {0: "batch"}, "mask": {0: "batch"}}
            axes.update({name: {0: "batch"} for name in OUTPUT_NAMES})
            kwargs["dynamic_axes"] = {k: v for k, v in axes.items() if k in names or k in OUTPUT_NAMES}
    else:
        # onnxscript's graph optimizer (0.7) drops the constant of a fused Clip in DINO's inverse_sigmoid chain and
        # writes an invalid file ("input 'sigmoid_2_min_1' ... is not output of any previous nodes"); onnxruntime
        # folds and fuses constants itself when it loads the graph.
        kwargs.update(dynamo=True, optimize=False)
        if dynamic:
            auto = torch.export.Dim.AUTO
            shapes = {"images": {0: auto, 2: auto, 3: auto}, "mask": {0: auto, 1: auto, 2: auto}}
            if fixed:
                shapes = {"images": {0: auto}, "mask": {0: auto}}
            kwargs["dynamic_shapes"] = {k: shapes[k] for k in names}
    with _final_layer_only(wrapper.detr), torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter's deprecation notice and tracer warnings about Python loops are expected here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(wrapper, inputs, str(output), **kwargs)
        except RuntimeError as err:
            if "selected index k out of range" not in str(err):
                raise
            # DINO's query selection: the top num_queries encoder tokens (one per cell of every level).
            queries = getattr(wrapper.detr, "num_queries", "?")
            raise ValueError(
                f"{height}x{width}: too few encoder tokens for the model's top-{queries} query selection; export at "
                "a larger --height/--width (images given to the graph need that many tokens too)"
            ) from None
    import onnx

    onnx.checker.check_model(str(output))  # an invalid graph fails here, not later in a runtime
    return output


@torch.no_grad()
def compare_with_onnxruntime(
    model: nn.Module, onnx_path: str | Path, images: Tensor, mask: Tensor | None = None
) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same inputs.

    Args:
        model: the exported model.
        onnx_path: the .onnx file.
        images: [B, 3, H, W] float32.
        mask: [B, H, W] bool, for graphs exported ``with_mask``.

    Returns:
        {'pred_logits': max |difference|, 'pred_boxes': max |difference|}.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing node raises anyway, without a second copy on stderr
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    expected_inputs = [i.name for i in session.get_inputs()]
    feeds = {"images": images.cpu().numpy()}
    if "mask" in expected_inputs:
        if mask is None:
            mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        feeds["mask"] = mask.cpu().numpy()
    elif mask is not None and bool(mask.any()):
        raise ValueError(f"{onnx_path} was exported without a mask input: export again with --with_mask")
    ort_outputs = session.run(list(OUTPUT_NAMES), feeds)
    wrapper = ExportableDETR(model).eval()
    device = next(model.parameters()).device
    with _final_layer_only(wrapper.detr):
        torch_outputs = wrapper(images.to(device), None if mask is None else mask.to(device))
    return {
        name: float((torch.from_numpy(ort) - ref.float().cpu()).abs().max())
        for name, ort, ref in zip(OUTPUT_NAMES, ort_outputs, torch_outputs)
    }


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of this tool."""
    parser = argparse.ArgumentParser("Export a detector to ONNX")
    parser.add_argument("--checkpoint", required=True, help="trained checkpoint: path or https URL")
    parser.add_argument("--output", default="model.onnx")
    parser.add_argument("--height", type=int, default=None,
                        help="example/fixed height (default 800; fixed-size models: theirs)")  # fmt: skip
    parser.add_argument("--width", type=int, default=None,
                        help="example/fixed width (default 1066; fixed-size models: theirs)")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--dynamic", action="store_true", help="symbolic batch size, height and width")
    parser.add_argument("--with_mask", action="store_true", help="add the padding mask input [B, H, W] bool")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17 torchscript, 18 dynamo)")
    parser.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch on random inputs")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted difference for --check")
    return parser


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Export, optionally check; returns the measured differences with --check. Bad input exits with one line."""
    args = get_args_parser().parse_args(argv)
    from run.checkpoint import CheckpointError
    from run.model_loading import load_model

    try:
        model = load_model(args.checkpoint, device="cpu")[0]
        from tools.export import fixed_input_size

        fixed = fixed_input_size(model)
        args.height = args.height or (fixed[0] if fixed else 800)
        args.width = args.width or (fixed[1] if fixed else 1066)
        path = export_onnx(
            model,
            args.output,
            args.height,
            args.width,
            args.batch_size,
            args.dynamic,
            args.with_mask,
            args.opset,
            args.exporter,
        )
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # e.g. a missing --checkpoint: one line
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}")
    if not args.check:
        return None
    report = _measure(model, path, torch.randn(args.batch_size, 3, args.height, args.width))
    if args.dynamic:  # a second size and batch, padded when the graph takes a mask
        height, width = max(32, args.height * 3 // 4), args.width + 32
        if fixed is not None:  # a second batch at the fixed size
            height, width = args.height, args.width
        mask = torch.zeros(args.batch_size + 1, height, width, dtype=torch.bool)
        if args.with_mask:
            mask[-1, height // 2 :, :] = True
        report.update(_measure(model, path, torch.randn(args.batch_size + 1, 3, height, width), mask))
    print("max |onnxruntime - pytorch|: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
    worst = max(report, key=report.get)
    if not report[worst] <= args.tolerance:  # NaN fails too
        raise SystemExit(
            f"error: parity check failed: {worst} differs from PyTorch by {report[worst]:.2e} > --tolerance "
            f"{args.tolerance} ({path} was written; do not use it as is)"
        )
    return report


def _measure(model: nn.Module, path: Path, images: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """compare_with_onnxruntime keyed '<output> <H>x<W>'; a graph onnxruntime cannot run exits in one line."""
    batch, _, height, width = images.shape
    size = f"{height}x{width}"
    try:
        diffs = compare_with_onnxruntime(model, path, images, mask)
    except Exception as err:  # onnxruntime's errors share no base class beyond Exception
        reason = " ".join(str(err).split()) or type(err).__name__
        raise SystemExit(
            f"error: parity check failed: onnxruntime cannot run {path} on {batch} image(s) of {size} "
            f"({reason[:300]}); {path} was written, do not use it as is"
        ) from None
    return {f"{k} {size}": v for k, v in diffs.items()}


if __name__ == "__main__":
    main()
