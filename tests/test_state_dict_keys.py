"""State-dict contract: build_model's keys and shapes equal the committed manifests of the published layout.

Regenerate the manifests (then review the diff against DESIGN.md section 1) with:
    DETR_WRITE_MANIFESTS=1 python -m pytest -q tests/test_state_dict_keys.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from main import get_args_parser
from models import build_model

MANIFESTS = Path(__file__).parent / "manifests"
# Published checkpoints: DETR R50, R50-DC5, R101, R101-DC5; plus the other layout-changing flags.
CONFIGS = {
    "r50": [],
    "r50_dc5": ["--dilation"],
    "r101": ["--backbone", "resnet101"],
    "r101_dc5": ["--backbone", "resnet101", "--dilation"],
    "learned": ["--position_embedding", "learned"],
    "pre_norm": ["--pre_norm"],
    "no_aux_loss": ["--no_aux_loss"],
}


def _state_dict_lines(flags: list[str]) -> list[str]:
    """'name d0,d1,...' for each state-dict entry of the full-size model, built on the meta device (no memory)."""
    args = get_args_parser().parse_args(["--backbone_weights", "none", "--device", "meta", *flags])
    with torch.device("meta"):
        model, _, _ = build_model(args)
    return [f"{name} {','.join(map(str, tensor.shape))}" for name, tensor in model.state_dict().items()]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_dict_matches_manifest(config):
    lines = _state_dict_lines(CONFIGS[config])
    path = MANIFESTS / f"{config}.txt"
    if os.environ.get("DETR_WRITE_MANIFESTS"):
        path.write_text("\n".join(lines) + "\n")
    expected = path.read_text().splitlines()
    missing = sorted(set(expected) - set(lines))
    unexpected = sorted(set(lines) - set(expected))
    assert not missing and not unexpected, f"{config}: missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert lines == expected  # same order as well


def _manifest(config: str) -> dict[str, tuple[int, ...]]:
    entries = {}
    for line in (MANIFESTS / f"{config}.txt").read_text().splitlines():
        name, shape = line.split(" ")
        entries[name] = tuple(int(d) for d in shape.split(",") if d)
    return entries


def test_hand_checked_published_keys():
    """Keys and shapes of the published DETR-R50 checkpoint, written by hand independently of the manifests."""
    r50 = dict(_manifest("r50"))
    built = {line.split(" ")[0]: line.split(" ")[1] for line in _state_dict_lines([])}
    assert r50.keys() == built.keys()
    expected = {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.bn1.weight": (64,),
        "backbone.0.body.bn1.running_mean": (64,),
        "backbone.0.body.bn1.running_var": (64,),
        "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.0.body.layer1.0.downsample.1.weight": (256,),
        "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "transformer.encoder.layers.0.self_attn.in_proj_weight": (768, 256),
        "transformer.encoder.layers.5.self_attn.in_proj_bias": (768,),
        "transformer.encoder.layers.0.self_attn.out_proj.weight": (256, 256),
        "transformer.encoder.layers.0.linear1.weight": (2048, 256),
        "transformer.encoder.layers.0.linear2.weight": (256, 2048),
        "transformer.encoder.layers.0.norm2.bias": (256,),
        "transformer.decoder.layers.5.multihead_attn.in_proj_weight": (768, 256),
        "transformer.decoder.layers.0.self_attn.out_proj.bias": (256,),
        "transformer.decoder.layers.5.norm3.weight": (256,),
        "transformer.decoder.norm.weight": (256,),
        "query_embed.weight": (100, 256),
        "input_proj.weight": (256, 2048, 1, 1),
        "input_proj.bias": (256,),
        "class_embed.weight": (92, 256),
        "class_embed.bias": (92,),
        "bbox_embed.layers.0.weight": (256, 256),
        "bbox_embed.layers.2.weight": (4, 256),
        "bbox_embed.layers.2.bias": (4,),
    }
    for name, shape in expected.items():
        assert r50.get(name) == shape, name
    assert not any("num_batches_tracked" in k or k.startswith("transformer.encoder.norm") for k in r50)
    assert not any(k.startswith(("backbone.0.body.fc.", "backbone.1.")) for k in r50)
    # 53 convs + 53 frozen norms x 4 buffers; 6 x 12 encoder + 6 x 18 decoder + 2; 11 head entries
    assert sum(k.startswith("backbone.") for k in r50) == 53 + 53 * 4
    assert sum(k.startswith("transformer.") for k in r50) == 6 * 12 + 6 * 18 + 2
    assert len(r50) == 265 + 182 + 11


def test_variants_differ_from_r50_only_where_published():
    r50 = _manifest("r50")
    assert _manifest("r50_dc5") == r50 and _manifest("no_aux_loss") == r50  # no parameter changes
    learned = _manifest("learned")
    assert set(learned) - set(r50) == {"backbone.1.row_embed.weight", "backbone.1.col_embed.weight"}
    assert learned["backbone.1.row_embed.weight"] == (50, 128)
    pre_norm = _manifest("pre_norm")
    assert set(pre_norm) - set(r50) == {"transformer.encoder.norm.weight", "transformer.encoder.norm.bias"}
    r101 = _manifest("r101")
    assert "backbone.0.body.layer3.22.conv3.weight" in r101 and "backbone.0.body.layer3.23.conv1.weight" not in r101
    assert len(r101) == len(r50) + 17 * 3 * 5  # 17 more bottlenecks, 3 convs + 3 norms x 4 buffers each
    assert _manifest("r101_dc5") == r101
