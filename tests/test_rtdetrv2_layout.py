"""RT-DETRv2 state-dict layout of the five published recipes, written from the contract (DESIGN_RTDETR "State
dict"), and strict loading of the published ImageNet PResNet-vd backbone files."""

from __future__ import annotations

import pytest
import torch

from models.presnet import PResNet, build_presnet, load_presnet_weights
from models.rtdetrv2 import RECIPES, build_model, recipe

# recipe -> (depth, trainable BN, enc hidden, enc ffn, enc expansion, decoder layers, keys, trainable elements)
PUBLISHED = {
    "r18vd": (18, True, 256, 1024, 0.5, 3, 538, 20_184_464),
    "r34vd": (34, True, 256, 1024, 0.5, 4, 665, 31_441_668),
    "r50vd": (50, False, 256, 1024, 1.0, 6, 744, 42_862_860),
    "r50vd_m": (50, False, 256, 1024, 0.5, 6, 768, 36_565_260),
    "r101vd": (101, False, 384, 2048, 1.0, 6, 999, 76_527_756),
}
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def expected_manifest(depth: int, bn: bool, enc_h: int, enc_ff: int, expansion: float, layers: int, k: int = 80):
    """key -> shape, from the contract's description of the published modules."""
    keys: dict[str, tuple] = {}

    def norm(prefix: str, c: int, batch_norm: bool = True) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        if batch_norm:
            keys[f"{prefix}.num_batches_tracked"] = ()

    def conv_norm(prefix: str, cout: int, cin: int, ksize: int, batch_norm: bool = True) -> None:
        keys[f"{prefix}.conv.weight"] = (cout, cin, ksize, ksize)
        norm(f"{prefix}.norm", cout, batch_norm)

    def linear(prefix: str, cout: int, cin: int) -> None:
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (cout, cin), (cout,)

    def layer_norm(prefix: str, c: int) -> None:
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (c,), (c,)

    def mha(prefix: str, c: int) -> None:
        keys[f"{prefix}.in_proj_weight"], keys[f"{prefix}.in_proj_bias"] = (3 * c, c), (3 * c,)
        linear(f"{prefix}.out_proj", c, c)

    # Backbone.
    for name, cin, cout in (("conv1_1", 3, 32), ("conv1_2", 32, 32), ("conv1_3", 32, 64)):
        conv_norm(f"backbone.conv1.{name}", cout, cin, 3, bn)
    bottleneck = depth >= 50
    cin = 64
    for stage, (count, width) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512))):
        out = width * (4 if bottleneck else 1)
        for j in range(count):
            p = f"backbone.res_layers.{stage}.blocks.{j}"
            if bottleneck:
                conv_norm(f"{p}.branch2a", width, cin, 1, bn)
                conv_norm(f"{p}.branch2b", width, width, 3, bn)
                conv_norm(f"{p}.branch2c", out, width, 1, bn)
            else:
                conv_norm(f"{p}.branch2a", width, cin, 3, bn)
                conv_norm(f"{p}.branch2b", width, width, 3, bn)
            if j == 0:
                conv_norm(f"{p}.short" if stage == 0 else f"{p}.short.conv", out, cin, 1, bn)
            cin = out
    backbone_out = [w * (4 if bottleneck else 1) for w in (128, 256, 512)]
    # Hybrid encoder.
    hid = int(enc_h * expansion)
    for lvl, c in enumerate(backbone_out):
        conv_norm(f"encoder.input_proj.{lvl}", enc_h, c, 1)
    p = "encoder.encoder.0.layers.0"
    mha(f"{p}.self_attn", enc_h)
    linear(f"{p}.linear1", enc_ff, enc_h)
    linear(f"{p}.linear2", enc_h, enc_ff)
    layer_norm(f"{p}.norm1", enc_h)
    layer_norm(f"{p}.norm2", enc_h)
    for i in range(2):
        conv_norm(f"encoder.lateral_convs.{i}", enc_h, enc_h, 1)
        conv_norm(f"encoder.downsample_convs.{i}", enc_h, enc_h, 3)
        for block in (f"encoder.fpn_blocks.{i}", f"encoder.pan_blocks.{i}"):
            conv_norm(f"{block}.conv1", hid, 2 * enc_h, 1)
            conv_norm(f"{block}.conv2", hid, 2 * enc_h, 1)
            for b in range(3):
                conv_norm(f"{block}.bottlenecks.{b}.conv1", hid, hid, 3)
                conv_norm(f"{block}.bottlenecks.{b}.conv2", hid, hid, 1)
            if hid != enc_h:
                conv_norm(f"{block}.conv3", enc_h, hid, 1)
    # Decoder.
    d = 256
    for lvl in range(3):
        conv_norm(f"decoder.input_proj.{lvl}", d, enc_h, 1)
    for i in range(layers):
        p = f"decoder.decoder.layers.{i}"
        mha(f"{p}.self_attn", d)
        layer_norm(f"{p}.norm1", d)
        linear(f"{p}.cross_attn.sampling_offsets", 8 * 12 * 2, d)
        linear(f"{p}.cross_attn.attention_weights", 8 * 12, d)
        linear(f"{p}.cross_attn.value_proj", d, d)
        linear(f"{p}.cross_attn.output_proj", d, d)
        keys[f"{p}.cross_attn.num_points_scale"] = (12,)
        layer_norm(f"{p}.norm2", d)
        linear(f"{p}.linear1", 1024, d)
        linear(f"{p}.linear2", d, 1024)
        layer_norm(f"{p}.norm3", d)
    keys["decoder.denoising_class_embed.weight"] = (k + 1, d)
    linear("decoder.query_pos_head.layers.0", 2 * d, 4)
    linear("decoder.query_pos_head.layers.1", d, 2 * d)
    linear("decoder.enc_output.proj", d, d)
    layer_norm("decoder.enc_output.norm", d)
    for score, box in [("decoder.enc_score_head", "decoder.enc_bbox_head")] + [
        (f"decoder.dec_score_head.{i}", f"decoder.dec_bbox_head.{i}") for i in range(layers)
    ]:
        linear(score, k, d)
        linear(f"{box}.layers.0", d, d)
        linear(f"{box}.layers.1", d, d)
        linear(f"{box}.layers.2", 4, d)
    keys["decoder.anchors"] = (1, 8400, 4)
    keys["decoder.valid_mask"] = (1, 8400, 1)
    return keys


def meta_model(name: str):
    with torch.device("meta"):
        return build_model(recipe(name), 80)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_recipe_state_dict_matches_published_layout(name: str) -> None:
    depth, bn, enc_h, enc_ff, expansion, layers, num_keys, trainable = PUBLISHED[name]
    model = meta_model(name)
    state = model.state_dict()
    expected = expected_manifest(depth, bn, enc_h, enc_ff, expansion, layers)
    assert len(expected) == num_keys  # the manifest itself reproduces the published count
    assert len(state) == num_keys
    assert sorted(state) == sorted(expected)
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in state.items() if tuple(v.shape) != expected[k]}
    assert not wrong
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64
        elif key == "decoder.valid_mask":
            assert value.dtype == torch.bool
        else:
            assert value.dtype == torch.float32, key
    # No shared tensors.
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.named_parameters()))
    assert len(list(model.named_buffers(remove_duplicate=False))) == len(list(model.named_buffers()))
    # The AIFI position table is a buffer but not saved.
    assert "encoder.pos_embed2" in dict(model.named_buffers())
    assert "encoder.pos_embed2" not in state


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_frozen_parameters(name: str) -> None:
    frozen = [n for n, p in meta_model(name).named_parameters() if not p.requires_grad]
    if name in ("r18vd", "r34vd"):
        assert frozen == []  # freeze_at -1, trainable BN
    else:  # freeze_at 0: the stem convolutions; FrozenBN has no parameters
        assert frozen == [f"backbone.conv1.conv1_{i}.conv.weight" for i in (1, 2, 3)]


def test_recipes_are_the_five_published() -> None:
    assert sorted(RECIPES) == sorted(PUBLISHED)
    assert RECIPES["r50vd_m"].eval_idx == 2 and RECIPES["r50vd"].eval_idx == -1
    with pytest.raises(ValueError, match="unknown RT-DETRv2 recipe"):
        recipe("r200vd")


def test_full_model_state_dict_round_trip_strict() -> None:
    torch.manual_seed(0)
    source = build_model(recipe("r18vd"), 80)
    torch.manual_seed(1)
    target = build_model(recipe("r18vd"), 80)
    target.load_state_dict(source.state_dict(), strict=True)
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_backbone_file_loads_strictly(tmp_path) -> None:
    torch.manual_seed(0)
    trained = PResNet(18, freeze_norm=False)  # the published files come from trainable BN (num_batches_tracked)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    path = tmp_path / "ResNet18_vd_pretrained.pth"
    torch.save(trained.state_dict(), path)
    for freeze_norm in (False, True):
        backbone = build_presnet("presnet18vd", freeze_norm=freeze_norm)
        load_presnet_weights(backbone, path)
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, trained.state_dict()[key]), key

    state = trained.state_dict()
    state["fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="1 unexpected"):
        load_presnet_weights(build_presnet("presnet18vd"), tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_presnet_weights(build_presnet("presnet34vd"), path)
    with pytest.raises(ValueError, match="cannot read"):
        load_presnet_weights(build_presnet("presnet18vd"), tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="unknown PResNet backbone"):
        build_presnet("presnet20vd")


def test_presnet_output_strides_and_channels() -> None:
    for depth, channels in ((18, [128, 256, 512]), (50, [512, 1024, 2048])):
        backbone = PResNet(depth).eval()
        outs = backbone(torch.rand(1, 3, 64, 96))
        assert [tuple(o.shape) for o in outs] == [(1, c, 64 // s, 96 // s) for c, s in zip(channels, (8, 16, 32))]
