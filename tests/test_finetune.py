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
