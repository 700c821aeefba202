"""load_for_finetuning: matching tensors come from the checkpoint, only mismatched heads are re-initialised."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args

from models import build_model
from run.checkpoint import save_checkpoint
from run.finetune import FinetuneError, load_for_finetuning


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

    from run.run_state import load_weights

    path, _ = _save(tmp_path, *DEFORMABLE)
    args = parse_tiny_args(*DEFORMABLE, "--num_classes", "5", "--finetune", str(path))
    model = _target(*DEFORMABLE, "--num_classes", "5")
    assert load_weights(args, SimpleNamespace(model=model)) == 0
    prior = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(model.class_embed[0].bias, torch.full((5,), prior))
    assert "re-initialised class_embed.1.weight (checkpoint [91, 32] -> model [5, 32])" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- DINO

DINO = FAMILY_FLAGS["dino"]
DINO_CLASS_HEADS = [
    f"{owner}.{p}"
    for owner in ("class_embed.0", "class_embed.1", "transformer.decoder.class_embed.0",
                  "transformer.decoder.class_embed.1", "transformer.enc_out_class_embed")
    for p in ("weight", "bias")
]  # fmt: skip


@pytest.mark.parametrize("keep_initial", [True, False], ids=["fresh_values", "reset_parameters"])
def test_dino_91_class_checkpoint_to_5_classes(tmp_path, capsys, keep_initial):
    """The shared class head (under all its names), the encoder's head and label_enc (the label book follows
    num_classes) are re-initialised and listed; shared tensors stay shared; everything else is loaded."""
    path, source = _save(tmp_path, *DINO)  # default dataset_file coco: 91 classes, label book 91 + 1 rows
    model = _target(*DINO, "--num_classes", "5", "--num_queries", "7")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    reinit = load_for_finetuning(model, str(path), keep_initial=keep_initial)

    assert sorted(reinit) == sorted([*DINO_CLASS_HEADS, "label_enc.weight", "transformer.tgt_embed.weight"])
    _assert_from_checkpoint(model, source, skip=reinit)
    state = model.state_dict()
    assert state["label_enc.weight"].shape == (6, 32) and state["transformer.tgt_embed.weight"].shape == (7, 32)
    prior = torch.full((5,), -math.log((1 - 0.01) / 0.01))
    if keep_initial:  # the fresh build's values: the focal prior on every class bias
        for name in reinit:
            torch.testing.assert_close(state[name], fresh[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(state["transformer.enc_out_class_embed.bias"], prior)
    else:  # the modules' own init: nn.Linear's kaiming bound, nn.Embedding's N(0, 1)
        assert state["class_embed.0.bias"].abs().max() <= 1 / math.sqrt(32)
        assert 0.5 < state["label_enc.weight"].std() < 1.5
    heads, decoder = model.class_embed, model.transformer.decoder
    assert heads[0] is heads[1] and all(a is b for a, b in zip(decoder.class_embed, heads))  # one shared head
    assert len({state[f"{n}.weight"].data_ptr() for n in ("class_embed.0", "transformer.decoder.class_embed.1")}) == 1
    assert model.transformer.enc_out_class_embed is not heads[0]  # the encoder's copy stays separate

    printed = capsys.readouterr().out
    assert printed.count("re-initialised") == len(reinit)
    assert "re-initialised label_enc.weight (checkpoint [92, 32] -> model [6, 32])" in printed
    assert "re-initialised transformer.enc_out_class_embed.weight (checkpoint [91, 32] -> model [5, 32])" in printed


def test_dino_finetune_with_a_set_label_book_keeps_label_enc(tmp_path):
    path, source = _save(tmp_path, *DINO)
    model = _target(*DINO, "--num_classes", "5", "--dn_labelbook_size", "91")
    reinit = load_for_finetuning(model, str(path), verbose=False, keep_initial=True)
    assert sorted(reinit) == sorted(DINO_CLASS_HEADS)  # label_enc [92, 32] fits: loaded
    torch.testing.assert_close(model.label_enc.weight, source["label_enc.weight"], rtol=0, atol=0)


def test_dino_finetune_flag_trains_on_other_classes(tmp_path, capsys):
    """main.py --finetune from a 91-class DINO checkpoint on the generated data (13 classes): one flag, one epoch."""
    import main as main_module
    from run.checkpoint import load_checkpoint

    path, source = _save(tmp_path, *DINO)
    args = parse_tiny_args(*DINO, "--finetune", str(path), "--synthetic_dir", str(tmp_path / "data"),
                           "--synthetic_train_size", "2", "--synthetic_val_size", "1", "--input_scale", "0.1",
                           "--batch_size", "2", "--epochs", "1", "--no_progress",
                           "--output_dir", str(tmp_path / "run"))  # fmt: skip
    args._explicit = frozenset({"device"})
    main_module.main(args)
    printed = capsys.readouterr().out
    assert "re-initialised label_enc.weight (checkpoint [92, 32] -> model [14, 32])" in printed
    assert "re-initialised class_embed.1.weight (checkpoint [91, 32] -> model [13, 32])" in printed
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["model"]
    assert state["transformer.decoder.class_embed.0.weight"].shape == (13, 32)
    assert state["label_enc.weight"].shape == (14, 32) and state["transformer.enc_out_class_embed.bias"].shape == (13,)
