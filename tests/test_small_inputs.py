"""Small images (issue 18, items 5 and 6): two-stage / DINO query selection with fewer encoder tokens than queries,
and batch size 1 when the coarsest feature level is 1x1 with one channel per GroupNorm group."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILY_FLAGS, parse_tiny_args
from torch import nn

import main as main_module
from models import build_model
from models import multiscale as multiscale_module
from models.multiscale import GroupNorm
from util.misc import nested_tensor_from_tensor_list

# Tiny versions of the command lines of the issue, with their published query counts.
DINO_FLAGS = (*FAMILY_FLAGS["dino"], "--num_queries", "900")
TWO_STAGE_FLAGS = ("--model", "deformable_detr", "--with_box_refine", "--two_stage", "--num_queries", "300")
# 64 x 64 pixels, 4 levels at strides 8..64: 8*8 + 4*4 + 2*2 + 1*1 encoder tokens.
SMALL_TOKENS = 85

TARGETS = [
    {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
    {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])},
]


def _small_batch():
    """Two images padded to 64 x 64 (the second one is padded): SMALL_TOKENS tokens per image."""
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 48, 56)])


def _record_calls(module: nn.Module) -> list[torch.Tensor]:
    """Outputs of every call of ``module``, in order."""
    calls: list[torch.Tensor] = []
    module.register_forward_hook(lambda mod, inputs, output: calls.append(output.detach()))
    return calls


def _train_step(model, criterion, samples, targets, needs_targets: bool) -> dict:
    model.train()
    outputs = model(samples, targets) if needs_targets else model(samples)
    losses = criterion(outputs, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    return outputs


def test_dino_small_images_select_every_encoder_token_and_train():
    """900 queries, 85 tokens: every token becomes a query, in descending best-class-logit order; training (with
    denoising) and post-processing run on the 85 queries."""
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(parse_tiny_args(*DINO_FLAGS))
    scores = _record_calls(model.transformer.enc_out_class_embed)  # 1st call: all tokens, 2nd: selected
    outputs = _train_step(model, criterion, _small_batch(), TARGETS, needs_targets=True)

    assert outputs["pred_logits"].shape == (2, SMALL_TOKENS, 91) and outputs["pred_boxes"].shape == (2, SMALL_TOKENS, 4)
    assert all(aux["pred_logits"].shape[1] == SMALL_TOKENS for aux in outputs["aux_outputs"])
    assert outputs["dn_meta"]["output_known_lbs_bboxes"]["pred_logits"].shape[1] == outputs["dn_meta"]["pad_size"]
    all_tokens = scores[0]
    assert all_tokens.shape[1] == SMALL_TOKENS
    expected = all_tokens.max(-1).values.sort(dim=1, descending=True).values
    selected = outputs["interm_outputs"]["pred_logits"].detach().max(-1).values
    torch.testing.assert_close(selected, expected, rtol=0, atol=1e-6)

    model.eval()
    with torch.no_grad():
        detections = postprocessors["bbox"](model(_small_batch()), torch.tensor([[64, 64], [48, 56]]))
    assert [len(d["scores"]) for d in detections] == [20, 20]  # --num_select 20 of 85 * 91 (query, class) pairs
    assert all(torch.isfinite(d["boxes"]).all() for d in detections)


def test_two_stage_deformable_small_images_select_every_proposal_and_train():
    """300 two-stage queries, 85 tokens: the initial references are all 85 proposals by descending class-0 logit."""
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(parse_tiny_args(*TWO_STAGE_FLAGS))
    references: list[torch.Tensor] = []
    model.transformer.register_forward_hook(lambda mod, inputs, output: references.append(output[1].detach()))
    outputs = _train_step(model, criterion, _small_batch(), TARGETS, needs_targets=False)

    assert outputs["pred_logits"].shape == (2, SMALL_TOKENS, 91)
    assert all(aux["pred_boxes"].shape[1] == SMALL_TOKENS for aux in outputs["aux_outputs"])
    enc_logits = outputs["enc_outputs"]["pred_logits"].detach()[..., 0]
    enc_boxes = outputs["enc_outputs"]["pred_boxes"].detach()
    order = enc_logits.argsort(dim=1, descending=True)
    expected = torch.gather(enc_boxes, 1, order[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(references[0], expected, rtol=0, atol=0)

    model.eval()
    with torch.no_grad():
        detections = postprocessors["bbox"](model(_small_batch()), torch.tensor([[64, 64], [48, 56]]))
    assert [len(d["scores"]) for d in detections] == [100, 100]


@pytest.mark.parametrize("flags", [DINO_FLAGS, TWO_STAGE_FLAGS], ids=["dino", "two_stage"])
def test_normal_size_keeps_num_queries_and_the_published_selection(flags, monkeypatch):
    """With at least as many tokens as queries nothing changes: num_queries outputs, bit-identical to a fixed
    top-num_queries selection (the published code)."""
    flags = (*flags, "--num_queries", "60")  # 85 tokens >= 60 queries
    torch.manual_seed(0)
    model = build_model(parse_tiny_args(*flags))[0].eval()
    samples = _small_batch()
    with torch.no_grad():
        outputs = model(samples)
        # The one selection both families use (models.multiscale.select_top_queries).
        monkeypatch.setattr(multiscale_module, "num_selected_queries", lambda num_queries, num_tokens: num_queries)
        fixed = model(samples)
    assert outputs["pred_logits"].shape[1] == 60
    assert torch.equal(outputs["pred_logits"], fixed["pred_logits"])
    assert torch.equal(outputs["pred_boxes"], fixed["pred_boxes"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags", [(*DINO_FLAGS, "--input_scale", "0.2"), (*TWO_STAGE_FLAGS, "--input_scale", "0.08")], ids=["dino", "two"]
)
def test_the_command_lines_of_the_issue_train_and_evaluate(flags, tmp_path):
    """One epoch + evaluation of `--model dino --input_scale 0.2` and `--two_stage` at `--input_scale 0.08`."""
    from test_main_e2e import _args

    stats = main_module.main(_args(tmp_path / "data", tmp_path / "run", *flags, "--epochs", "1"))
    assert stats is not None and (tmp_path / "run" / "checkpoint.pth").is_file()


# ------------------------------------------------------------------------------------- item 6: GroupNorm


def test_group_norm_equals_torch_on_ordinary_inputs_and_keeps_the_keys():
    torch.manual_seed(0)
    ours, reference = GroupNorm(32, 64), nn.GroupNorm(32, 64)
    nn.init.normal_(ours.weight)
    nn.init.normal_(ours.bias)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 5, 7)
    assert torch.equal(ours(x), reference(x))
    assert set(ours.state_dict()) == {"weight", "bias"} and isinstance(ours, nn.GroupNorm)


@pytest.mark.parametrize("family", ["deformable_detr", "dino"])
def test_batch_size_one_with_a_1x1_level_and_one_channel_per_group(family):
    """--hidden_dim 32 (32 groups of 1 channel), 64 x 64 image: the extra level is 1x1, so each group holds one value
    and normalises to 0 (output = the GroupNorm bias), what that image also gets inside a batch of two."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse_tiny_args(*FAMILY_FLAGS[family]))
    extra_norm = model.input_proj[-1][1]
    nn.init.normal_(extra_norm.bias)
    seen = _record_calls(extra_norm)
    image = torch.randn(1, 3, 64, 64)
    outputs = _train_step(model, criterion, image, TARGETS[:1], needs_targets=family == "dino")
    assert outputs["pred_logits"].shape[0] == 1
    assert seen[0].shape == (1, 32, 1, 1)
    torch.testing.assert_close(seen[0].flatten(), extra_norm.bias.detach(), rtol=0, atol=1e-4)
    with torch.no_grad():
        model.eval()(torch.cat([image, torch.randn(1, 3, 64, 64)]))
    # Not bit for bit: the backbone's convolutions round differently per batch size, and 1 / sqrt(eps) amplifies it.
    torch.testing.assert_close(seen[-1][:1], seen[0], rtol=0, atol=1e-4)
