"""load_for_finetuning: matching tensors come from the checkpoint, only mismatched heads are re-initialised."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import parse_tiny_args

from models import build_model
from util.checkpoint import save_checkpoint
from util.finetune import FinetuneError, load_for_finetuning


def _save(tmp_path, *flags, name="source.pth", bare=False):
    args = parse_tiny_args(*flags)
    torch.manual_seed(123)
    model = build_model(args)[0]
    state = model.state_dict()
    path = tmp_path / name
    save_checkpoint(state if bare else {"model": state, "args": vars(args)}, path)
    return path, {k: v.clone() for k, v in state.items()}


def _target(*flags):
    torch.manual_seed(7)
    return build_model(parse_tiny_args(*flags))[0]


def _assert_from_checkpoint(model, source, skip=(), prefix=""):
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        torch.testing.assert_close(value, source[key[len(prefix) :]], rtol=0, atol=0, msg=key)


def test_other_num_classes_and_queries_reinitialise_only_the_heads(tmp_path, capsys):
    path, source = _save(tmp_path)
    model = _target("--num_classes", "5", "--num_queries", "7")
    with torch.no_grad():  # poison the heads: they must come back through the modules' own init
        model.class_embed.weight.fill_(100.0)
        model.class_embed.bias.fill_(100.0)
        model.query_embed.weight.fill_(100.0)
    reinit = load_for_finetuning(model, str(path))

    assert reinit == ["class_embed.weight", "class_embed.bias", "query_embed.weight"]
    _assert_from_checkpoint(model, source, skip=reinit)
    bound = 1 / math.sqrt(32)  # nn.Linear's kaiming-uniform bound for fan_in 32
    assert model.class_embed.weight.shape == (6, 32) and model.class_embed.weight.abs().max() <= bound
    assert model.class_embed.bias.abs().max() <= bound
    assert model.query_embed.weight.shape == (7, 32) and 0.5 < model.query_embed.weight.std() < 1.5  # N(0, 1)

    printed = capsys.readouterr().out
    assert f"loaded {len(source) - 3}/{len(source)} tensors, 3 not loaded" in printed
    assert "re-initialised class_embed.weight (checkpoint [92, 32] -> model [6, 32])" in printed
    assert "re-initialised query_embed.weight (checkpoint [10, 32] -> model [7, 32])" in printed
    assert printed.count("re-initialised") == 3


def test_same_architecture_loads_everything(tmp_path):
    path, source = _save(tmp_path, bare=True)
    model = _target()
    assert load_for_finetuning(model, str(path), verbose=False) == []
    _assert_from_checkpoint(model, source)


def test_only_num_classes_differs(tmp_path):
    path, source = _save(tmp_path)
    model = _target("--num_classes", "2")
    assert load_for_finetuning(model, str(path), verbose=False) == ["class_embed.weight", "class_embed.bias"]
    _assert_from_checkpoint(model, source, skip=("class_embed.weight", "class_embed.bias"))


def test_another_architecture_is_a_clear_error(tmp_path):
    path, _ = _save(tmp_path, "--enc_layers", "2")
    with pytest.raises(FinetuneError, match=r"have no place in this model \(e\.g\. transformer\.encoder\.layers\.1"):
        load_for_finetuning(_target(), str(path), verbose=False)
    path, _ = _save(tmp_path, "--dim_feedforward", "48", name="ffn.pth")
    with pytest.raises(FinetuneError, match=r"shapes differ outside the class/query heads \(transformer\..*linear1"):
        load_for_finetuning(_target(), str(path), verbose=False)
    torch.save({"optimizer": {}}, tmp_path / "no_model.pth")
    with pytest.raises(FinetuneError, match="no_model.pth: expected a checkpoint with a 'model' state dict"):
        load_for_finetuning(_target(), str(tmp_path / "no_model.pth"))


def test_detection_checkpoint_into_segmentation_model_and_back(tmp_path, capsys):
    path, source = _save(tmp_path)
    segm = _target("--masks", "--num_classes", "4")
    reinit = load_for_finetuning(segm, str(path))
    assert {k for k in reinit if not k.startswith(("bbox_attention.", "mask_head."))} == {
        "detr.class_embed.weight",
        "detr.class_embed.bias",
    }
    _assert_from_checkpoint(segm, source, skip=reinit, prefix="detr.")

    segm_path = tmp_path / "segm.pth"
    save_checkpoint({"model": segm.state_dict()}, segm_path)
    detector = _target("--num_classes", "4")
    capsys.readouterr()
    assert load_for_finetuning(detector, str(segm_path)) == []
    head = sum(k.startswith(("bbox_attention.", "mask_head.")) for k in segm.state_dict())
    assert f"ignored {head} mask-head tensors" in capsys.readouterr().out
    _assert_from_checkpoint(detector, {k[5:]: v for k, v in segm.state_dict().items() if k.startswith("detr.")})


# ------------------------------------------------------------------------------------- Deformable DETR

DEFORMABLE = ("--model", "deformable_detr")
VARIANTS = {"plain": (), "refine": ("--with_box_refine",), "two_stage": ("--with_box_refine", "--two_stage")}


def _class_heads(num_pred: int, two_stage: bool) -> list[str]:
    names = [f"class_embed.{layer}.{p}" for layer in range(num_pred) for p in ("weight", "bias")]
    return names + ([f"transformer.decoder.{n}" for n in names] if two_stage else [])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deformable_91_class_checkpoint_to_5_classes(tmp_path, capsys, variant):
    """Every per-layer class head is re-initialised (and listed); shared heads stay shared; the rest is loaded."""
    flags = (*DEFORMABLE, *VARIANTS[variant])
    two_stage = variant == "two_stage"
    path, source = _save(tmp_path, *flags)  # default dataset_file coco: 91 classes
    model = _target(*flags, "--num_classes", "5", "--num_queries", "7")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    reinit = load_for_finetuning(model, str(path), keep_initial=True)

    num_pred = 2 + two_stage  # tiny: 2 decoder layers (+ the two-stage proposal head)
    expected = _class_heads(num_pred, two_stage) + ([] if two_stage else ["query_embed.weight"])
    assert sorted(reinit) == sorted(expected)
    _assert_from_checkpoint(model, source, skip=reinit)
    state = model.state_dict()
    for name in reinit:  # the fresh build's values: the focal prior on every class bias
        torch.testing.assert_close(state[name], fresh[name], rtol=0, atol=0, msg=name)
    prior = -math.log((1 - 0.01) / 0.01)
    assert all(torch.allclose(state[f"class_embed.{i}.bias"], torch.full((5,), prior)) for i in range(num_pred))

    printed = capsys.readouterr().out
    assert f"{len(reinit)} not loaded" in printed and printed.count("re-initialised") == len(reinit)
    for name in _class_heads(num_pred, two_stage):
        shape = "91, 32" if name.endswith("weight") else "91"
        assert f"re-initialised {name} (checkpoint [{shape}] -> model [5" in printed

    heads, decoder = model.class_embed, model.transformer.decoder
    if variant == "plain":  # one head under every index
        assert all(head is heads[0] for head in heads)
        assert len({state[f"class_embed.{i}.weight"].data_ptr() for i in range(num_pred)}) == 1
    else:  # independent copies, the decoder's entries the very same modules
        assert len({id(head) for head in heads}) == num_pred
        assert all(a is b for a, b in zip(decoder.bbox_embed, model.bbox_embed))
    if two_stage:
        assert all(decoder.class_embed[i].weight is heads[i].weight for i in range(num_pred))
        assert state["transformer.decoder.class_embed.1.bias"].data_ptr() == state["class_embed.1.bias"].data_ptr()


def test_deformable_finetune_through_load_weights_keeps_the_focal_prior(tmp_path, capsys):
    """--finetune of a Deformable DETR run: the class heads are not reset to nn.Linear's default bias."""
    from types import SimpleNamespace

    from util.run_state import load_weights

    path, _ = _save(tmp_path, *DEFORMABLE)
    args = parse_tiny_args(*DEFORMABLE, "--num_classes", "5", "--finetune", str(path))
    model = _target(*DEFORMABLE, "--num_classes", "5")
    assert load_weights(args, SimpleNamespace(model=model)) == 0
    prior = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(model.class_embed[0].bias, torch.full((5,), prior))
    assert "re-initialised class_embed.1.weight (checkpoint [91, 32] -> model [5, 32])" in capsys.readouterr().out
