"""torch.export of Deformable DETR and DINO in eval mode with symbolic batch, height and width (issue 14: 2).

The deformable attention switches to its grid_sample path while exporting and keeps the level sizes symbolic
(models/ms_deform_attn.py ``level_sizes``), so the program equals the eager model within 1e-5 on image sizes other
than the export size. Uses tools/export.py (``export_program``, whose smallest side follows the
levels: a 4-level model's extra stride-64 level needs 2 cells per side, so sides start at 65; DETR's at 64).
"""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args

from models import build_model
from tools.export import compare_with_eager, example_inputs, export_program, min_side

TOLERANCE = 1e-5
EXPORT_SIZE = (2, 96, 128)  # batch, height, width of the example input
OTHER_SIZES = [(1, 72, 160), (3, 136, 80)]
MIN_SIDE = 65  # the stride-64 level of a 4-level model has 2 cells
MODELS = {
    "deformable_detr": FAMILY_FLAGS["deformable_detr"],
    # DINO (two-stage style encoder proposals, top-k query selection): 10 queries, and the top-k over the encoder
    # tokens needs at least that many (a 65 x 65 image has 119).
    "dino": FAMILY_FLAGS["dino"],
}


def export_family_program(model: torch.nn.Module) -> torch.export.ExportedProgram:
    assert min_side(model) == MIN_SIDE  # tools/export.py derives the smallest side from the levels
    return export_program(model, *EXPORT_SIZE[1:], batch_size=EXPORT_SIZE[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_program_matches_eager_on_other_sizes_and_uses_the_mask(name, tmp_path):
    """About 20 s per model on one core (the export traces every level and layer)."""
    torch.manual_seed(0)
    model = build_model(parse_tiny_args(*MODELS[name]))[0].eval()
    torch.export.save(export_family_program(model), str(tmp_path / f"{name}.pt2"))
    program = torch.export.load(str(tmp_path / f"{name}.pt2"))  # a save/load round trip
    assert model.aux_loss is True  # restored after the export
    torch.manual_seed(1)
    for size in OTHER_SIZES:
        images, mask = example_inputs(*size)  # the last image padded at the bottom and right
        diffs = compare_with_eager(model, program, images, mask)
        assert {"pred_logits", "pred_boxes"} <= set(diffs)
        assert max(diffs.values()) <= TOLERANCE, (size, diffs)
        out = program.module()(images, mask)
        assert out["pred_boxes"].shape == (size[0], 10, 4) and out["pred_logits"].shape == (size[0], 10, 91)

    # Padding half of one image changes its predictions only: level sizes and valid ratios are traced, not fixed.
    # (Logits: a fresh Deformable DETR's boxes are its learned reference points, whatever the image.)
    images, mask = example_inputs(2, 96, 128)
    mask[:] = False
    padded = mask.clone()
    padded[1, :, 64:] = True
    plain, half = program.module()(images, mask), program.module()(images, padded)
    torch.testing.assert_close(plain["pred_logits"][0], half["pred_logits"][0], rtol=0, atol=TOLERANCE)
    assert (plain["pred_logits"][1] - half["pred_logits"][1]).abs().max() > 1e-3
    assert max(compare_with_eager(model, program, images, padded).values()) <= TOLERANCE
