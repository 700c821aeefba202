"""Export a trained detector for deployment: ``torch.export`` (a .pt2 program) or ONNX.

Examples:
    python tools/export.py --checkpoint runs/r50/checkpoint.pth --output detr.pt2 --check
    python tools/export.py --format onnx --checkpoint runs/r50/checkpoint.pth --output detr.onnx --dynamic --check

``--format torch_export`` (default) writes a ``torch.export`` program with symbolic batch size, height and width
(``--static`` fixes them to the example size). It takes ``images`` [B, 3, H, W] (normalised with the ImageNet
mean/std, as predict.py does) and ``mask`` [B, H, W] bool (True on padding; all False for unpadded images) and
returns a dict of the model's tensor outputs: ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4] (cx, cy, w, h
normalised to each unpadded image) and, for segmentation models, ``pred_masks`` [B, Q, H/4, W/4] logits.
Auxiliary (per-decoder-layer) outputs are training aids and are left out. Load it with
``torch.export.load(path).module()(images, mask)``. Any model ``models.build_model`` builds is exported the same
way. ``--format onnx`` runs ``tools/export_onnx.py`` with the remaining flags.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.misc import NestedTensor  # noqa: E402

FORMATS = ("torch_export", "onnx")
# Smallest and largest exported image side. The ResNet's stride-32 map must have at least 2 cells per side
# (torch.export specialises a side of 1), so 64 px is the smallest supported side.
MIN_SIDE, MAX_SIDE = 64, 8192


class TensorInterface(nn.Module):
    """Tensor-in, dict-of-tensors-out view of a detector: ``(images, mask) -> {name: tensor}``.

    Args:
        model: any model built by ``models.build_model`` (DETR, DETRsegm, and the other families), which takes a
            NestedTensor and returns a dict; entries that are not tensors (auxiliary outputs) are dropped.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] bool (True on padding) -> the model's tensor outputs."""
        outputs = self.model(NestedTensor(images, mask))
        return {name: value for name, value in outputs.items() if isinstance(value, Tensor)}


@contextlib.contextmanager
def final_layer_only(model: nn.Module) -> Iterator[None]:
    """Switch off every ``aux_loss`` inside ``model`` (the detector, or the one a wrapper holds), then restore."""
    saved = [
        (module, module.aux_loss) for module in model.modules() if isinstance(getattr(module, "aux_loss", None), bool)
    ]
    for module, _ in saved:
        module.aux_loss = False
    try:
        yield
    finally:
        for module, value in saved:
            module.aux_loss = value


def example_inputs(
    batch_size: int, height: int, width: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Random images [B, 3, H, W] and a mask [B, H, W] whose last image is padded at the bottom and right."""
    images = torch.randn(batch_size, 3, height, width, device=device)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    mask[-1, height * 3 // 4 :, :] = True
    mask[-1, :, width * 3 // 4 :] = True
    return images, mask


def min_side(model: nn.Module) -> int:
    """Smallest dynamic image side of ``model``: its coarsest feature map needs 2 cells per side.

    DETR: ``MIN_SIDE``. Deformable DETR / DINO add stride-2 levels after the last backbone stage (stride <= 32), so
    with e = extra levels the coarsest stride is at most 32 * 2^e and one pixel more gives it 2 cells.
    """
    levels = getattr(model, "num_feature_levels", 1)
    backbone = getattr(model, "backbone", None)
    if levels <= 1 or backbone is None:
        return MIN_SIDE
    extra = levels - len(backbone[0].stage_channels)
    return max(MIN_SIDE, 32 * 2**extra + 1)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) a model's exported graph is fixed to (RT-DETRv2: ``--eval_spatial_size``), None when any size goes."""
    size = getattr(model, "fixed_input_size", None)
    return tuple(size) if size is not None else None


def check_fixed_size(model: nn.Module, height: int, width: int) -> None:
    """Raise ValueError (one line) when ``model`` exports at one size only and (height, width) is another."""
    size = fixed_input_size(model)
    if size is not None and (height, width) != size:
        raise ValueError(f"this model exports at {size[0]}x{size[1]} only (its eval anchors; dynamic batch): "
                         f"pass --height {size[0]} --width {size[1]}")  # fmt: skip


def export_program(
    model: nn.Module, height: int = 800, width: int = 1066, batch_size: int = 2, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (set to eval mode) through ``TensorInterface``.

    Args:
        model: any model built by ``models.build_model``; exported on the device of its parameters.
        height, width, batch_size: the example input; with ``dynamic`` (default) batch size (1..1024), height and
            width (``MIN_SIDE``..``MAX_SIDE``) are symbolic, otherwise fixed to these. A batch of 1 would be
            specialised by torch.export, hence the default 2.
        dynamic: symbolic sizes.

    Returns:
        The ExportedProgram (``torch.export.save`` writes it; ``.module()`` runs it).
    """
    check_fixed_size(model, height, width)
    fixed = fixed_input_size(model) is not None
    smallest = min_side(model)
    if dynamic and not fixed and not (smallest <= height <= MAX_SIDE and smallest <= width <= MAX_SIDE):
        raise ValueError(f"--height/--width must lie in {smallest}..{MAX_SIDE} for a dynamic export of this model")
    if dynamic and batch_size < 2:
        raise ValueError("--batch_size must be at least 2 for a dynamic export (torch.export specialises 1)")
    interface = TensorInterface(model.eval()).eval()
    device = next(model.parameters()).device
    inputs = example_inputs(batch_size, height, width, device)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        rows = torch.export.Dim("height", min=smallest, max=MAX_SIDE)
        cols = torch.export.Dim("width", min=smallest, max=MAX_SIDE)
        shapes = {"images": {0: batch, 2: rows, 3: cols}, "mask": {0: batch, 1: rows, 2: cols}}
        if fixed:  # per-size buffers in the graph: only the batch is symbolic
            shapes = {"images": {0: batch}, "mask": {0: batch}}
    with final_layer_only(model), torch.no_grad():
        return torch.export.export(interface, inputs, dynamic_shapes=shapes, strict=False)


@torch.no_grad()
def compare_with_eager(model: nn.Module, program: torch.export.ExportedProgram, images: Tensor, mask: Tensor) -> dict:
    """Largest |exported - eager| per output on the same inputs (on the model's device)."""
    device = next(model.parameters()).device
    images, mask = images.to(device), mask.to(device)
    with final_layer_only(model):
        expected = TensorInterface(model.eval())(images, mask)
    got = program.module()(images, mask)
    if set(got) != set(expected):
        raise ValueError(f"exported outputs {sorted(got)} differ from the model's {sorted(expected)}")
    return {name: float((got[name].float() - expected[name].float()).abs().max()) for name in expected}


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of ``--format torch_export`` (``--format onnx`` takes tools/export_onnx.py's)."""
    parser = argparse.ArgumentParser("Export a DETR-family detector (torch.export or ONNX)")
    parser.add_argument("--format", default="torch_export", choices=FORMATS)
    parser.add_argument("--checkpoint", required=True, help="trained checkpoint: path or https URL")
    parser.add_argument("--output", default="detr.pt2")
    parser.add_argument("--height", type=int, default=None,
                        help="example/fixed height (default 800; fixed-size models: theirs)")  # fmt: skip
    parser.add_argument("--width", type=int, default=None,
                        help="example/fixed width (default 1066; fixed-size models: theirs)")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=2, help="example (or, with --static, fixed) batch size")
    parser.add_argument("--static", action="store_true", help="fix batch size, height and width to the example")
    parser.add_argument("--device", default="cpu", help="device to export on (the program runs there)")
    parser.add_argument("--check", action="store_true", help="compare with the eager model on two other sizes")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted difference for --check")
    return parser


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Export (and optionally check); returns the measured differences with --check. Bad input exits with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selector = argparse.ArgumentParser(add_help=False)
    selector.add_argument("--format", default="torch_export", choices=FORMATS)
    chosen, rest = selector.parse_known_args(argv)
    if chosen.format == "onnx":
        from tools.export_onnx import main as export_onnx_main

        return export_onnx_main(rest)
    args = get_args_parser().parse_args(argv)
    from run.checkpoint import CheckpointError
    from run.model_loading import load_model

    try:
        model = load_model(args.checkpoint, device=args.device)[0]
        fixed = fixed_input_size(model)
        args.height = args.height or (fixed[0] if fixed else 800)
        args.width = args.width or (fixed[1] if fixed else 1066)
        program = export_program(model, args.height, args.width, args.batch_size, dynamic=not args.static)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
    except RuntimeError as err:  # torch.export's guard failures are long; keep the first line
        raise SystemExit(f"error: torch.export failed: {str(err).strip().splitlines()[0]}") from None
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(output))
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    if not args.check:
        return None
    sizes = [(args.batch_size, args.height, args.width)]
    if not args.static and fixed is not None:  # two other batch sizes at the fixed size
        sizes += [(1, args.height, args.width), (3, args.height, args.width)]
    elif not args.static:  # two other batch sizes and image sizes
        sizes += [
            (1, max(min_side(model), args.height * 3 // 4), args.width + 32),
            (3, args.height + 40, max(min_side(model), args.width // 2)),
        ]
    loaded = torch.export.load(str(output))
    report = {}
    for batch, height, width in sizes:
        diffs = compare_with_eager(model, loaded, *example_inputs(batch, height, width))
        report.update({f"{name} {batch}x{height}x{width}": value for name, value in diffs.items()})
    print("max |exported - eager|: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
    if max(report.values()) > args.tolerance:
        raise SystemExit(f"error: exported outputs differ from the eager model by more than {args.tolerance}")
    return report


if __name__ == "__main__":
    main()
