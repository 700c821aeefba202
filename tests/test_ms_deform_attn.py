"""Multi-scale deformable attention: both kernels against an explicit float64 bilinear oracle, and the module."""

from __future__ import annotations

import io
import math

import pytest
import torch

import models.ms_deform_attn as msda
from models.ms_deform_attn import MSDA_KERNELS, MSDeformAttn, ms_deform_attn_core

SHAPES = [(5, 7), (3, 1), (4, 4)]


def oracle_core(value, shapes, locations, weights):
    """Explicit bilinear sampling: floor, 4 corners, zero outside, pixel centres at (i + 0.5) / size."""
    b, _, m, d = value.shape
    q = locations.shape[1]
    out = value.new_zeros(b, q, m, d)
    start = 0
    batch = torch.arange(b).view(b, 1, 1, 1)
    head = torch.arange(m).view(1, 1, m, 1)
    for lvl, (h, w) in enumerate(shapes):
        level = value[:, start : start + h * w].reshape(b, h, w, m, d)
        x = locations[:, :, :, lvl, :, 0] * w - 0.5  # [B, Q, M, P]
        y = locations[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = (x0 + dx).long(), (y0 + dy).long()
                wx = (x - x0) if dx else (1 - (x - x0))
                wy = (y - y0) if dy else (1 - (y - y0))
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                corner = level[batch, yi.clamp(0, h - 1), xi.clamp(0, w - 1), head]  # [B, Q, M, P, D]
                factor = wx * wy * inside * weights[:, :, :, lvl]
                out = out + (factor[..., None] * corner).sum(3)
        start += h * w
    return out.reshape(b, q, m * d)


def make_case(shapes=SHAPES, b=2, q=6, m=3, d=4, p=2, low=-0.3, high=1.3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=gen, dtype=dtype)
    locations = low + (high - low) * torch.rand(b, q, m, len(shapes), p, 2, generator=gen, dtype=dtype)
    weights = torch.rand(b, q, m, len(shapes), p, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (value, locations, weights)]


def forward_and_grads(fn, tensors, seed=1):
    out = fn(*tensors)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad((out * probe).sum(), tensors)]


@pytest.mark.parametrize("kernel", MSDA_KERNELS)
@pytest.mark.parametrize("shapes", [SHAPES, [(3, 1)], [(1, 1), (2, 9), (5, 7), (6, 2)]])
def test_core_matches_oracle_forward_and_gradients(kernel, shapes):
    tensors = make_case(shapes)
    got = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, shapes, loc, a, kernel=kernel), tensors)
    want = forward_and_grads(lambda v, loc, a: oracle_core(v, shapes, loc, a), tensors)
    assert want[0].abs().max() > 0.1  # the case samples real values
    for name, g, w in zip(("out", "value", "locations", "weights"), got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("kernel", MSDA_KERNELS)
def test_gradcheck(kernel):
    tensors = make_case([(3, 4), (2, 1)], b=1, q=3, m=2, d=2, p=2)
    assert torch.autograd.gradcheck(
        lambda v, loc, a: ms_deform_attn_core(v, [(3, 4), (2, 1)], loc, a, kernel=kernel), tensors
    )


@pytest.mark.parametrize("kernel", MSDA_KERNELS)
def test_points_far_outside_read_zeros_and_get_no_gradient(kernel):
    value, locations, weights = make_case()
    with torch.no_grad():
        locations[:, :3] = -2.0
        locations[:, 3:] = 3.5
    out, _, grad_loc, grad_att = forward_and_grads(
        lambda v, loc, a: ms_deform_attn_core(v, SHAPES, loc, a, kernel=kernel), [value, locations, weights]
    )
    assert out.abs().max() == 0 and grad_loc.abs().max() == 0 and grad_att.abs().max() == 0


def test_float32_fast_equals_reference():
    shapes = [(20, 27), (10, 14), (5, 7), (3, 4)]
    tensors = make_case(shapes, b=2, q=50, m=8, d=32, p=4, low=-0.05, high=1.05, dtype=torch.float32)
    fast = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, shapes, loc, a, kernel="gather"), tensors)
    ref = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, shapes, loc, a, kernel="grid_sample"), tensors)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=0)
    for g, r in zip(fast[1:], ref[1:]):
        torch.testing.assert_close(g, r, atol=1e-5 * r.abs().max().item(), rtol=1e-5)


def test_shapes_as_tensor_or_list_and_materialised_fallback(monkeypatch):
    tensors = make_case()
    want = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, SHAPES, loc, a), tensors)
    as_tensor = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, torch.tensor(SHAPES), loc, a), tensors)
    monkeypatch.setattr(msda, "_FUSED_DEVICES", ())  # the explicit-gather path that MPS takes
    fallback = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, SHAPES, loc, a), tensors)
    for w, t, f in zip(want, as_tensor, fallback):
        torch.testing.assert_close(t, w, atol=0, rtol=0)
        torch.testing.assert_close(f, w, atol=1e-12, rtol=1e-12)


def test_bf16_inputs_are_sampled_in_float32():
    value, locations, weights = (t.detach() for t in make_case(dtype=torch.float32))
    args = (value.bfloat16(), SHAPES, locations.bfloat16(), weights.bfloat16())
    out = ms_deform_attn_core(*args)
    assert out.dtype == torch.bfloat16
    upcast = ms_deform_attn_core(*(a.float() if torch.is_tensor(a) else a for a in args))
    torch.testing.assert_close(out, upcast.bfloat16(), atol=0, rtol=0)


def _module_inputs(shapes, ref_dim, b=2, q=5, c=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    query = torch.randn(b, q, c, generator=gen)
    if ref_dim == 2:
        ref = torch.rand(b, q, len(shapes), 2, generator=gen)
    else:
        size = (0.1 + 0.3 * torch.rand(b, q, 1, 2, generator=gen)).expand(-1, -1, len(shapes), -1)
        ref = torch.cat([torch.rand(b, q, len(shapes), 2, generator=gen), size], -1)
    flat = torch.randn(b, s, c, generator=gen)
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[1, -4:] = True
    mask[1, 3:6] = True
    return query, ref, flat, mask


def oracle_module(module, query, ref, flat, shapes, mask):
    """The contract written out: projections, offsets / (W, H) or / P * wh * 0.5, softmax over L * P."""
    b, q, c = query.shape
    m, n_levels, p = module.n_heads, module.n_levels, module.n_points
    value = module.value_proj(flat).masked_fill(mask[..., None], 0).view(b, -1, m, c // m).double()
    offsets = module.sampling_offsets(query).view(b, q, m, n_levels, p, 2).double()
    weights = module.attention_weights(query).view(b, q, m, n_levels * p).double().softmax(-1)
    weights = weights.view(b, q, m, n_levels, p)
    ref = ref.double()[:, :, None, :, None]
    if ref.shape[-1] == 2:
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(n_levels, 1, 2)
        locations = ref + offsets / size
    else:
        locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    return module.output_proj(oracle_core(value, shapes, locations, weights).float())


@pytest.mark.parametrize("kernel", MSDA_KERNELS)
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_contract_with_padding(kernel, ref_dim):
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 1)]
    module = MSDeformAttn(16, n_levels=2, n_heads=4, n_points=3, kernel=kernel)
    with torch.no_grad():  # move off the init ring so offsets and weights differ per query
        module.sampling_offsets.weight.normal_(0, 0.3)
        module.attention_weights.weight.normal_(0, 0.3)
    query, ref, flat, mask = _module_inputs(shapes, ref_dim)
    start_index = torch.tensor([0, 35])
    out = module(query, ref, flat, torch.tensor(shapes), start_index, mask)
    want = oracle_module(module, query, ref, flat, shapes, mask)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    changed = flat.clone()
    changed[mask] = 100.0  # padded tokens must not be read
    torch.testing.assert_close(module(query, ref, changed, shapes, start_index, mask), out, atol=1e-6, rtol=0)
    assert (module(query, ref, flat, shapes, start_index, None) - out).abs().max() > 1e-3


def test_init_rule_and_state_dict_keys():
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    keys = {f"{n}.{p}" for n in ("sampling_offsets", "attention_weights", "value_proj", "output_proj") for p in "wb"}
    assert set(module.state_dict()) == {k.replace(".w", ".weight").replace(".b", ".bias") for k in keys}
    assert module.sampling_offsets.weight.shape == (8 * 3 * 4 * 2, 32)
    assert module.attention_weights.weight.shape == (8 * 3 * 4, 32)
    bias = module.sampling_offsets.bias.view(8, 3, 4, 2)
    # theta = 2 pi m / 8: (cos, sin) / max(|cos|, |sin|): head 0 (1, 0), 1 (1, 1), 2 (0, 1), 3 (-1, 1), 5 (-1, -1)
    by_hand = {0: (1.0, 0.0), 1: (1.0, 1.0), 2: (0.0, 1.0), 3: (-1.0, 1.0), 5: (-1.0, -1.0)}
    for head, (dx, dy) in by_hand.items():
        for point in range(4):
            for level in range(3):
                torch.testing.assert_close(bias[head, level, point], torch.tensor([dx, dy]) * (point + 1))
    assert module.sampling_offsets.weight.abs().max() == 0
    assert module.attention_weights.weight.abs().max() == 0 and module.attention_weights.bias.abs().max() == 0
    bound = math.sqrt(6 / (32 + 32))
    for linear in (module.value_proj, module.output_proj):
        assert linear.bias.abs().max() == 0
        assert 0.5 * bound < linear.weight.abs().max() <= bound


def test_sampling_offsets_bias_is_the_published_float32_computation():
    """Bit for bit the published float32 steps (DESIGN_DEFORMABLE.md), which differ from a float64 computation."""
    heads, levels, points = 8, 4, 4
    module = MSDeformAttn(d_model=32, n_levels=levels, n_heads=heads, n_points=points)
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(heads, 1, 1, 2).repeat(1, levels, points, 1)
    for i in range(points):
        grid[:, :, i, :] *= i + 1
    assert module.sampling_offsets.bias.dtype == torch.float32
    assert torch.equal(module.sampling_offsets.bias, grid.view(-1))
    thetas64 = torch.arange(heads, dtype=torch.float64) * (2.0 * math.pi / heads)
    grid64 = torch.stack([thetas64.cos(), thetas64.sin()], -1)
    grid64 = (grid64 / grid64.abs().max(-1, keepdim=True)[0]).view(heads, 1, 1, 2).repeat(1, levels, points, 1)
    grid64 = grid64 * torch.arange(1, points + 1, dtype=torch.float64).view(1, 1, -1, 1)
    assert not torch.equal(grid64.float().view(-1), grid.view(-1))  # the check can tell the two apart


def test_value_errors():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="kernel"):
        MSDeformAttn(kernel="cuda")
    value, locations, weights = make_case()
    with pytest.raises(ValueError, match="kernel"):
        ms_deform_attn_core(value, SHAPES, locations, weights, kernel="triton")
    module = MSDeformAttn(16, n_levels=2, n_heads=4, n_points=3)
    query, ref, flat, _ = _module_inputs([(5, 7), (3, 1)], 2)
    with pytest.raises(ValueError, match="2 or 4"):
        module(query, ref[..., :1], flat, [(5, 7), (3, 1)])


def test_bf16_autocast_module_close_to_float32():
    torch.manual_seed(0)
    shapes = [(10, 14), (5, 7)]
    module = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=2)
    query, ref, flat, mask = _module_inputs(shapes, 2, c=32)
    want = module(query, ref, flat, shapes, None, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(query, ref, flat, shapes, None, mask)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max().item()
    assert 0 < err < 0.03 * want.abs().max().item()


class _Wrapper(torch.nn.Module):
    def __init__(self, module, shapes):
        super().__init__()
        self.module, self.shapes = module, shapes

    def forward(self, query, ref, flat):
        return self.module(query, ref, flat, self.shapes)


def _small_exportable():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 1)]
    module = MSDeformAttn(16, n_levels=2, n_heads=4, n_points=3).eval()
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.3)
    query, ref, flat, _ = _module_inputs(shapes, 2)
    return _Wrapper(module, shapes), (query, ref, flat)


def test_torch_export_equals_eager_and_uses_reference(monkeypatch):
    wrapper, inputs = _small_exportable()
    calls = []
    reference = msda._grid_sample_core
    monkeypatch.setattr(msda, "_grid_sample_core", lambda *a: calls.append(1) or reference(*a))
    exported = torch.export.export(wrapper, inputs)
    assert calls  # the fast path is bypassed while exporting
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), wrapper(*inputs), atol=1e-6, rtol=1e-6)


def test_onnx_export_equals_eager():
    onnxruntime = pytest.importorskip("onnxruntime")
    wrapper, inputs = _small_exportable()
    buffer = io.BytesIO()
    torch.onnx.export(wrapper, inputs, buffer, opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), wrapper(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_equals_oracle():
    tensors = [t.detach().cuda().requires_grad_() for t in make_case()]
    got = forward_and_grads(lambda v, loc, a: ms_deform_attn_core(v, SHAPES, loc, a), tensors)
    cpu = [t.detach().cpu().requires_grad_() for t in tensors]
    want = forward_and_grads(lambda v, loc, a: oracle_core(v, SHAPES, loc, a), cpu)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, atol=1e-10, rtol=1e-10)
