"""Swin backbone: window helpers against brute force, numerics against torchvision's independent Swin, the
published DINO configurations' key layout and parameter counts, and loading published-layout weight files."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models.backbone import Joiner
from models.position_encoding import PositionEmbeddingSine
from models.swin_transformer import (
    SWIN_CONFIGS,
    SwinConfig,
    SwinTransformer,
    WindowAttention,
    build_swin_backbone,
    load_swin_weights,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from util.misc import NestedTensor

TINY = SwinConfig(
    embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, pretrain_img_size=64, drop_path_rate=0.0
)


def test_window_partition_and_reverse_match_explicit_indexing():
    x = torch.randn(2, 8, 12, 3)
    w = 4
    windows = window_partition(x, w)
    assert windows.shape == (2 * 2 * 3, w, w, 3)
    for b, r, c, i, j in itertools.product(range(2), range(2), range(3), range(w), range(w)):
        torch.testing.assert_close(windows[b * 6 + r * 3 + c, i, j], x[b, r * w + i, c * w + j], rtol=0, atol=0)
    torch.testing.assert_close(window_reverse(windows, w, 8, 12), x, rtol=0, atol=0)


@pytest.mark.parametrize("w", [3, 4, 7])
def test_relative_position_index_brute_force(w):
    expected = torch.empty(w * w, w * w, dtype=torch.long)
    for i, j in itertools.product(range(w * w), repeat=2):
        (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
        expected[i, j] = (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)
    index = relative_position_index(w)
    assert index.dtype == torch.long
    torch.testing.assert_close(index, expected, rtol=0, atol=0)
    assert int(index.max()) == (2 * w - 1) ** 2 - 1  # every table row is used


def test_relative_position_bias_brute_force():
    w, heads = 4, 3
    attn = WindowAttention(dim=12, window_size=w, num_heads=heads)
    table = attn.relative_position_bias_table
    assert table.shape == ((2 * w - 1) ** 2, heads)
    bias = attn.relative_position_bias()
    for h, i, j in itertools.product(range(heads), range(w * w), range(w * w)):
        (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
        assert bias[h, i, j] == table[(yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1), h]


@pytest.mark.parametrize("hp,wp,w,s", [(8, 12, 4, 2), (12, 12, 6, 3), (4, 4, 4, 2)])
def test_shifted_window_mask_brute_force(hp, wp, w, s):
    """After rolling by -s, two tokens of one window may attend iff neither axis wraps around between them:
    the token at rolled row r came from row (r + s) mod Hp, which wrapped iff r + s >= Hp."""
    mask = shifted_window_mask(hp, wp, w, s)
    n_cols = wp // w
    assert mask.shape == ((hp // w) * n_cols, w * w, w * w)
    for win, i, j in itertools.product(range(mask.shape[0]), range(w * w), range(w * w)):
        r0, c0 = divmod(win, n_cols)
        ri, ci = r0 * w + i // w, c0 * w + i % w
        rj, cj = r0 * w + j // w, c0 * w + j % w
        same = (ri + s >= hp) == (rj + s >= hp) and (ci + s >= wp) == (cj + s >= wp)
        assert mask[win, i, j] == (0.0 if same else -100.0)


def test_window_attention_matches_naive_softmax():
    torch.manual_seed(1)
    w, heads, dim, b = 4, 2, 8, 2
    attn = WindowAttention(dim, w, heads).double()
    mask = shifted_window_mask(8, 8, w, 2).double()  # 4 windows
    x = torch.randn(b * 4, w * w, dim, dtype=torch.double)
    out = attn(x, mask)
    q, k, v = attn.qkv(x).view(b * 4, w * w, 3, heads, dim // heads).unbind(2)
    bias = attn.relative_position_bias()
    expected = torch.empty_like(x)
    for n in range(b * 4):
        per_head = []
        for h in range(heads):
            logits = q[n, :, h] @ k[n, :, h].T / (dim // heads) ** 0.5 + bias[h] + mask[n % 4]
            per_head.append(logits.softmax(-1) @ v[n, :, h])
        expected[n] = attn.proj(torch.cat(per_head, -1))
    torch.testing.assert_close(out, expected)


def _copy_into_torchvision(ours: SwinTransformer, config: SwinConfig) -> torch.nn.Module:
    """torchvision's Swin (an independent implementation) with our weights under its names."""
    tv = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[config.patch_size] * 2,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=[config.window_size] * 2,
        stochastic_depth_prob=0.0,
    ).double()
    mapped = {
        "features.0.0.weight": "patch_embed.proj.weight",
        "features.0.0.bias": "patch_embed.proj.bias",
        "features.0.2.weight": "patch_embed.norm.weight",
        "features.0.2.bias": "patch_embed.norm.bias",
    }
    for key in tv.state_dict():
        parts = key.split(".")
        if parts[0] != "features" or parts[1] == "0" or key.endswith("relative_position_index"):
            continue
        index = int(parts[1])
        if index % 2 == 1:  # stage blocks: features.{2s+1}.{j}.<name>
            name = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            mapped[key] = f"layers.{(index - 1) // 2}.blocks.{parts[2]}.{name}"
        else:  # patch merging: features.{2s+2}.<name>
            mapped[key] = f"layers.{(index - 2) // 2}.downsample.{'.'.join(parts[2:])}"
    own = ours.state_dict()
    tv.load_state_dict({k: own[v] for k, v in mapped.items()}, strict=False)
    return tv


def test_stage_outputs_match_torchvision_swin_on_padded_odd_maps():
    """72 x 56 px -> 18 x 14 tokens (windows of 4 pad to 20 x 16), then 9 x 7 (odd: merging pads, windows pad)."""
    torch.manual_seed(2)
    ours = SwinTransformer(TINY, out_indices=(0, 1)).double().eval()
    tv = _copy_into_torchvision(ours, TINY).eval()
    images = torch.randn(2, 3, 72, 56, dtype=torch.double)
    outs = ours.forward_features(images)
    x0 = tv.features[1](tv.features[0](images))  # [B, H, W, C]
    x1 = tv.features[3](tv.features[2](x0))
    torch.testing.assert_close(outs[0], ours.norm0(x0).permute(0, 3, 1, 2))
    torch.testing.assert_close(outs[1], ours.norm1(x1).permute(0, 3, 1, 2))
    assert outs[1].shape == (2, 64, 9, 7)


def test_forward_on_padded_nested_tensor_with_odd_sizes():
    torch.manual_seed(3)
    model = SwinTransformer(TINY, out_indices=(0, 1)).eval()
    images = torch.zeros(2, 3, 37, 53)
    images[0] = torch.randn(3, 37, 53)
    images[1, :, :30, :41] = torch.randn(3, 30, 41)
    mask = torch.ones(2, 37, 53, dtype=torch.bool)
    mask[0] = False
    mask[1, :30, :41] = False
    out = model(NestedTensor(images, mask))
    assert list(out) == ["0", "1"] and model.strides == [4, 8] and model.num_channels == [32, 64]
    for key, (h, w, c) in zip(out, [(10, 14, 32), (5, 7, 64)]):
        assert out[key].tensors.shape == (2, c, h, w)
        expected_mask = F.interpolate(mask[None].float(), size=(h, w)).bool()[0]  # the published rule
        torch.testing.assert_close(out[key].mask, expected_mask, rtol=0, atol=0)
    # Padding to the patch size is zero padding: the 40 x 56 zero-padded image gives the same maps.
    padded = model.forward_features(F.pad(images, (0, 3, 0, 3)))
    for key, expected in zip(out, padded):
        torch.testing.assert_close(out[key].tensors, expected)


def test_activation_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(4)
    plain = SwinTransformer(TINY, out_indices=(0, 1))
    ckpt = SwinTransformer(TINY, out_indices=(0, 1), use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 40, 36)
    losses = [sum(o.square().sum() for o in m.forward_features(images)) for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# Published DINO Swin layout, written out here: per stage i, blocks j with these tensors, a PatchMerging
# downsample after every stage but the last, one output LayerNorm norm{i} per returned stage, no final `norm`
# and no classifier `head`.
def published_layout(embed: int, depths, heads, w: int, out_indices) -> dict[str, tuple[int, ...]]:
    keys = {
        "patch_embed.proj.weight": (embed, 3, 4, 4),
        "patch_embed.proj.bias": (embed,),
        "patch_embed.norm.weight": (embed,),
        "patch_embed.norm.bias": (embed,),
    }
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, nh),
                    p + "attn.relative_position_index": (w * w, w * w),
                    p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.qkv.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (4 * c, c),
                    p + "mlp.fc1.bias": (4 * c,),
                    p + "mlp.fc2.weight": (c, 4 * c),
                    p + "mlp.fc2.bias": (c,),
                }
            )
        if i < len(depths) - 1:
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            keys[f"layers.{i}.downsample.norm.weight"] = (4 * c,)
            keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
    for i in out_indices:
        keys[f"norm{i}.weight"] = (embed * 2**i,)
        keys[f"norm{i}.bias"] = (embed * 2**i,)
    return keys


# name: (embed dim, depths, heads, window, pretrain size) as published in DINO's build_swin_transformer.
PUBLISHED = {
    "swin_T_224_1k": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_B_224_22k": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_B_384_22k": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_L_224_22k": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_L_384_22k": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}
# Parameters of the published ImageNet-1k classifiers (torchvision's docs list the same models).
IMAGENET_1K_PARAMS = {"swin_T_224_1k": 28_288_354, "swin_B_224_22k": 87_768_224}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_key_layout_and_parameter_count(name):
    embed, depths, heads, w, size = PUBLISHED[name]
    with torch.device("meta"):
        model = build_swin_backbone(name, return_interm_indices=(0, 1, 2, 3))
        tv = torchvision.models.swin_transformer.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=embed,
            depths=list(depths),
            num_heads=list(heads),
            window_size=[w, w],
            stochastic_depth_prob=0.2,
        )
    assert model.pretrain_img_size == size and SWIN_CONFIGS[name].drop_path_rate == 0.2
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == published_layout(embed, depths, heads, w, (0, 1, 2, 3))
    assert model.layers[0].blocks[0].attn.relative_position_index.dtype == torch.long
    # torchvision's classifier minus its head and final norm, plus our four output norms.
    count = sum(p.numel() for p in model.parameters())
    final = embed * 8
    out_norms = 2 * sum(embed * 2**i for i in range(4))
    tv_count = sum(p.numel() for p in tv.parameters())
    assert count == tv_count - (final * 1000 + 1000) - 2 * final + out_norms
    if name in IMAGENET_1K_PARAMS:
        assert count == IMAGENET_1K_PARAMS[name] - (final * 1000 + 1000) - 2 * final + out_norms
    # Published: drop path rises linearly from 0 to 0.2 over all blocks.
    rates = [b.drop_path.p for layer in model.layers for b in layer.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and len(rates) == sum(depths)


@pytest.mark.parametrize("indices,norms", [((1, 2, 3), [1, 2, 3]), ((0, 1, 2, 3), [0, 1, 2, 3])])
def test_dino_swin_l_4_and_5_scale_backbone_keys(indices, norms):
    """DINO 4-scale (levels 1 2 3 + one extra conv level) vs 5-scale (0 1 2 3 + extra) Swin-L backbones."""
    with torch.device("meta"):
        joiner = Joiner(build_swin_backbone("swin_L_384_22k", indices), PositionEmbeddingSine(128, normalize=True))
    keys = {f"backbone.{k}" for k in joiner.state_dict()}
    assert {k.split(".")[2] for k in keys} == {"patch_embed", "layers"} | {f"norm{i}" for i in norms}
    assert "backbone.0.layers.3.blocks.1.attn.relative_position_index" in keys
    assert "backbone.0.layers.2.blocks.17.attn.relative_position_bias_table" in keys
    assert "backbone.0.layers.2.downsample.reduction.weight" in keys
    assert not any(".layers.3.downsample." in k or k.startswith(("backbone.0.norm.", "backbone.0.head")) for k in keys)
    assert joiner.num_channels == 1536 and joiner[0].num_channels == [192 * 2**i for i in norms]
    assert joiner[0].strides == [4 * 2**i for i in norms]


def _imagenet_layout(model: SwinTransformer, config: SwinConfig, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A published ImageNet Swin file's state dict: no norm{i}, a final `norm` and `head`, and `attn_mask` buffers
    for shifted blocks of stages whose classification-resolution map exceeds one window."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    final = config.embed_dim * 2 ** (len(config.depths) - 1)
    state.update(
        {
            "norm.weight": torch.rand(final),
            "norm.bias": torch.rand(final),
            "head.weight": torch.rand(num_classes, final),
            "head.bias": torch.rand(num_classes),
        }
    )
    w, resolution = config.window_size, config.pretrain_img_size // config.patch_size
    for i, depth in enumerate(config.depths):
        side = resolution // 2**i
        if side > w:
            for j in range(1, depth, 2):
                state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros((side // w) ** 2, w * w, w * w)
    return state


def test_published_imagenet_file_loads_strictly(tmp_path):
    torch.manual_seed(5)
    source = SwinTransformer(TINY, out_indices=(0, 1)).eval()
    state = _imagenet_layout(source, TINY)
    path = tmp_path / "swin_tiny_imagenet.pth"
    torch.save({"model": state}, path)
    torch.manual_seed(6)
    model = SwinTransformer(TINY, out_indices=(1,)).eval()
    report = load_swin_weights(model, str(path), "tiny")
    masks = ["layers.0.blocks.1.attn_mask", "layers.1.blocks.1.attn_mask"]  # 16 and 8 tokens > window 4
    assert report == {
        "dropped": sorted(["head.bias", "head.weight", "norm.bias", "norm.weight", *masks]),
        "missing": ["norm1.bias", "norm1.weight"],
    }
    for key, value in model.state_dict().items():
        if not key.startswith("norm1."):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    images = torch.randn(1, 3, 48, 40)
    torch.testing.assert_close(model.forward_features(images)[0], source.forward_features(images)[1])


def test_dino_checkpoint_backbone_loads_with_nothing_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(SWIN_CONFIGS, "swin_tiny_test", TINY)
    source = build_swin_backbone("swin_tiny_test", (0, 1))
    checkpoint = {f"backbone.0.{k}": v for k, v in source.state_dict().items()}
    checkpoint["transformer.level_embed"] = torch.zeros(4, 32)
    torch.save({"model": checkpoint, "epoch": 3}, tmp_path / "dino.pth")
    model = build_swin_backbone("swin_tiny_test", (0, 1), weights=str(tmp_path / "dino.pth"), train_backbone=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_weight_files_are_one_line_errors(tmp_path):
    model = SwinTransformer(TINY, out_indices=(1,))
    state = _imagenet_layout(model, TINY)
    cases = {
        "extra": {**state, "layers.0.blocks.0.attn.extra": torch.zeros(1)},
        "missing": {k: v for k, v in state.items() if k != "layers.1.blocks.0.mlp.fc1.weight"},
        "window": _imagenet_layout(SwinTransformer(SwinConfig(32, (2, 2), (2, 4), 3, 64), (1,)), TINY),
    }
    messages = {}
    for case, bad in cases.items():
        torch.save({"model": bad}, tmp_path / f"{case}.pth")
        with pytest.raises(ValueError) as err:
            load_swin_weights(model, str(tmp_path / f"{case}.pth"), "tiny")
        messages[case] = str(err.value)
        assert "\n" not in messages[case]
    assert "unexpected ['layers.0.blocks.0.attn.extra']" in messages["extra"]
    assert "missing ['layers.1.blocks.0.mlp.fc1.weight']" in messages["missing"]
    assert "relative_position_bias_table [25, 2] vs [49, 2]" in messages["window"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_swin_weights(model, str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="not downloaded"):
        build_swin_backbone("swin_T_224_1k", weights="imagenet")
    with pytest.raises(ValueError, match="choose one of"):
        build_swin_backbone("swin_S_224_1k")
    with pytest.raises(ValueError, match="return_interm_indices"):
        SwinTransformer(TINY, out_indices=(2,))
