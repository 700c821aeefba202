"""README sections that must follow the code (issue 18: 10): every torch.hub entry is listed, and the export
section reads each family's logits the way its postprocessor does."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import hubconf

ROOT = Path(__file__).resolve().parents[1]


def _section(title: str) -> str:
    """The README text under ``## title`` up to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _hub_entries() -> list[str]:
    """What torch.hub.list offers: the public functions defined in hubconf.py."""
    return sorted(
        name
        for name, value in vars(hubconf).items()
        if inspect.isfunction(value) and not name.startswith("_") and value.__module__ == hubconf.__name__
    )


def test_every_hub_entry_is_named_in_the_torch_hub_section():
    entries = _hub_entries()
    assert {"detr_resnet50", "deformable_detr_resnet50_two_stage", "dino_resnet50_5scale"} <= set(entries)
    named = set(re.findall(r"`(\w+)`", _section("torch.hub")))
    missing = [name for name in entries if name not in named]
    assert not missing, f"README's torch.hub section does not name {missing}"


def test_export_section_reads_logits_per_family():
    text = " ".join(_section("Export").split())
    detr = text.index('- DETR: [B, Q, K+1]; softmax over the K+1 columns, drop the last ("no object") column')
    focal = text.index('- Deformable DETR, DINO and RT-DETRv2: [B, Q, K], no "no object" column; sigmoid of each')
    assert detr < focal
    # No sentence that applies the softmax over K + 1 to every model.
    assert "Outputs: `pred_logits` [B, Q, K+1] (softmax" not in text


def test_prediction_section_explains_the_threshold_and_categories_per_family():
    text = " ".join(_section("Prediction and visualisation").split())
    assert "DETR gives one detection per query, scored by the softmax probability of its best class" in text
    assert 'Deformable DETR and DINO (and RT-DETRv2) have no "no object" class: the top `--num_select`' in text
    assert "a class id that is not one of them never appears in `predictions.json`" in text


def test_attention_section_covers_the_deformable_families_and_the_default_folder():
    text = " ".join(_section("Attention maps").split())
    assert "by default a folder `attention` beside the checkpoint" in text
    assert "sampling points of the last decoder layer" in text and "capture_sampling_points" in text
