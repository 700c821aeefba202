"""Family.head_prefixes: each family's dataset-specific tensors, as its tiny models show them (class count 3 vs 5,
query count 10 vs 12), and fine-tuning reading them from the family table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args

import models
from models import FAMILIES, build_model
from run.checkpoint import save_checkpoint
from run.finetune import FinetuneError, load_for_finetuning

# The variants whose heads differ per family (DETRsegm's detector sits under "detr.").
VARIANTS = {
    "detr": [(), ("--masks",)],
    "deformable_detr": [(), ("--with_box_refine",), ("--with_box_refine", "--two_stage")],
    "dino": [()],
    "rtdetrv2": [()],
}
SEGM_PREFIX = "detr."


def _shapes(family: str, variant: tuple[str, ...], num_classes: int, num_queries: int) -> dict[str, torch.Size]:
    args = parse_tiny_args(*FAMILY_FLAGS[family], "--num_queries", str(num_queries), *variant)
    model = build_model(args, num_classes=num_classes)[0]
    return {k: v.shape for k, v in model.state_dict().items()}


def _detector_key(key: str, variant: tuple[str, ...]) -> str:
    return key[len(SEGM_PREFIX) :] if "--masks" in variant else key


def test_every_family_has_a_row_here():
    assert set(VARIANTS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_head_prefixes_cover_exactly_the_count_dependent_tensors(family):
    prefixes = FAMILIES[family].head_prefixes
    assert prefixes and all(p.endswith(".") for p in prefixes), prefixes
    matched: set[str] = set()
    for variant in VARIANTS[family]:
        base = _shapes(family, variant, 3, 10)
        changed = set()
        for num_classes, num_queries in ((5, 10), (3, 12)):
            other = _shapes(family, variant, num_classes, num_queries)
            assert other.keys() == base.keys()
            changed |= {_detector_key(k, variant) for k in base if base[k] != other[k]}
        assert changed, f"{family} {variant}: no tensor depends on the class or query count"
        uncovered = sorted(k for k in changed if not k.startswith(prefixes))
        assert not uncovered, f"{family} {variant}: count-dependent tensors outside head_prefixes: {uncovered}"
        keys = [_detector_key(k, variant) for k in base]
        matched |= {p for p in prefixes if any(k.startswith(p) for k in keys)}
        # Only heads: every tensor under a prefix changes shape with the class or query count.
        fixed = sorted(k for k in keys if k.startswith(prefixes) and k not in changed)
        assert not fixed, f"{family} {variant}: tensors under head_prefixes that never change shape: {fixed}"
    assert matched == set(prefixes), f"{family}: prefixes matching no tensor: {sorted(set(prefixes) - matched)}"


def test_the_coverage_check_can_fail():
    """A prefix list missing a head is caught the way the test above catches it."""
    base, other = _shapes("detr", (), 3, 10), _shapes("detr", (), 5, 12)
    changed = {k for k in base if base[k] != other[k]}
    assert changed == {"class_embed.weight", "class_embed.bias", "query_embed.weight"}  # by hand: 4/6 rows, 10/12
    assert [k for k in sorted(changed) if not k.startswith(("class_embed.",))] == ["query_embed.weight"]


def _checkpoint(tmp_path, family: str, num_classes: int) -> str:
    torch.manual_seed(0)
    model = build_model(parse_tiny_args(*FAMILY_FLAGS[family]), num_classes=num_classes)[0]
    path = tmp_path / f"{family}_{num_classes}.pth"
    save_checkpoint({"model": model.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("family", ["rtdetrv2", "detr"])
def test_finetuning_reads_the_heads_from_the_family(tmp_path, monkeypatch, family):
    path = _checkpoint(tmp_path, family, 3)
    model = build_model(parse_tiny_args(*FAMILY_FLAGS[family]), num_classes=5)[0]
    reinit = load_for_finetuning(model, path, verbose=False, keep_initial=True)
    assert reinit and all(k.startswith(FAMILIES[family].head_prefixes) for k in reinit)

    # The same load with the family's row lacking its heads: the class-count change is now an error.
    monkeypatch.setitem(models.FAMILIES, family, dataclasses.replace(FAMILIES[family], head_prefixes=()))
    with pytest.raises(FinetuneError, match="shapes differ outside the class/query heads"):
        load_for_finetuning(model, path, verbose=False, keep_initial=True)


def _decoder_only(out_features: int) -> torch.nn.Module:
    """Top-level decoder keys: not DETR's (its modules sit under transformer.), nor any other family's."""
    return torch.nn.ModuleDict({"decoder": torch.nn.Linear(2, out_features)})


def test_finetuning_a_model_no_family_claims_needs_prefixes(tmp_path):
    path = tmp_path / "decoder.pth"
    save_checkpoint({"model": _decoder_only(3).state_dict()}, path)
    with pytest.raises(FinetuneError, match="pass reinit_prefixes"):
        load_for_finetuning(_decoder_only(4), str(path), verbose=False)
    reinit = load_for_finetuning(_decoder_only(4), str(path), reinit_prefixes=("decoder.",), verbose=False)
    assert reinit == ["decoder.weight", "decoder.bias"]
