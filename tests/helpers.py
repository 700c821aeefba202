"""Helpers the tests import (``from helpers import ...``): tiny model flags that build offline in well under a
second, the run flags per detector family, a parser shortcut and seeded detection targets. Fixtures live in
``conftest.py``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cli.arguments import get_args_parser  # noqa: E402

TINY_FLAGS = [
    "--backbone", "resnet18",
    "--backbone_weights", "none",
    "--hidden_dim", "32",
    "--nheads", "2",
    "--enc_layers", "1",
    "--dec_layers", "2",
    "--dim_feedforward", "64",
    "--num_queries", "10",
    "--dropout", "0.0",
    "--device", "cpu",
    "--num_workers", "0",
]  # fmt: skip


# Run flags per detector family (``--model`` first). DINO refuses --lr_backbone 0 (published: "Please set
# lr_backbone > 0"), so its runs train the backbone slowly; few detections and denoising queries keep them fast.
FAMILY_FLAGS = {
    "detr": ("--model", "detr"),
    "deformable_detr": ("--model", "deformable_detr"),
    "dino": ("--model", "dino", "--lr_backbone", "1e-5", "--num_select", "20", "--dn_number", "4"),
    # RT-DETRv2: R18-vd with trainable BN at width 32, images resized to 64 x 64 (its eval anchors), no
    # multi-scale batches, no warm-up (runs of a few steps would never leave it); its EMA stays on.
    "rtdetrv2": ("--model", "rtdetrv2", "--backbone", "presnet18vd", "--freeze_at", "-1", "--no_freeze_norm",
                 "--enc_hidden_dim", "32", "--enc_dim_feedforward", "64", "--num_select", "20", "--dn_number", "4",
                 "--eval_spatial_size", "64", "64", "--multiscale_sizes", "--warmup_iters", "0"),
}


def parse_tiny_args(*extra: str):
    """Parse the tiny model flags plus ``extra`` (later flags win)."""
    return get_args_parser().parse_args([*TINY_FLAGS, *extra])


def box_targets(counts: tuple[int, ...] = (3, 2), num_classes: int = 5, seed: int = 11) -> list[dict]:
    """Seeded targets, one dict per image: 'labels' [n] int64 in [0, num_classes), 'boxes' [n, 4] normalised
    cxcywh (centres in [0.2, 0.8], sides in [0.1, 0.4])."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in counts:
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.1
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes], dim=1)})
    return targets
