"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, section 4.1) in plain PyTorch.

No compiled extension: the core runs on CPU, CUDA and MPS. Two kernels compute the same numbers:

- ``'gather'`` (default): bilinear sampling over the whole flattened value at once. Each level is
  zero-padded (so out-of-map corners read zeros without bounds tests), the 4 corner weights of every point
  are folded into its attention weight, and one ``F.embedding_bag`` (weighted sum of table rows, fused: the
  [B, Q, M, L*P*4, D] corner values are never materialised) gives the output. The table gradient sorts the
  points once and accumulates the transposed bags; no Python loop over queries, one over levels only.
  On MPS (no embedding_bag) the same rows are gathered explicitly.
- ``'grid_sample'``: the straightforward per-level ``F.grid_sample`` formulation, kept as the executable
  reference. It is also used automatically under ``torch.onnx.export``/``torch.export``/``torch.jit``
  tracing (ONNX GridSample, opset >= 16), where the level sizes must be known ints.

Autocast (bf16/fp16): the core always samples in float32 (float64 stays float64) with autocast disabled and
returns the value's dtype; the module forms the sampling locations and the softmax in float32. Measured on
CPU at the benchmark's half-size inputs (outputs up to ~1.8, float64 as truth): float32 max abs error 7e-6;
bf16 value with float32 locations (what the module does under autocast) 7e-3; bf16 locations 0.26-0.32
(8 mantissa bits on a coordinate in [0, 1] move a point by up to ~0.3 px on a 134-px level); everything in
bf16 through grid_sample 0.41-0.54. Hence float32 locations and sampling.

Exporting: the level sizes must be Python ints at trace time (pass a list of (H, W) to torch.export; a
tensor of shapes becomes a constant under the ONNX tracer).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDA_KERNELS", "MSDeformAttn", "ms_deform_attn_core"]

MSDA_KERNELS = ("gather", "grid_sample")

# Devices with F.embedding_bag (per_sample_weights); elsewhere (MPS) the corner rows are gathered explicitly.
_FUSED_DEVICES = ("cpu", "cuda")

SpatialShapes = Tensor | Sequence[tuple[int, int]]


def _is_exporting() -> bool:
    return bool(
        torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def _shapes_as_ints(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def level_sizes(spatial_shapes: SpatialShapes) -> list:
    """(H, W) per level: ints, or while exporting the traced [L, 2] tensor's entries (so the graph keeps dynamic
    image sizes instead of the example input's level sizes)."""
    if isinstance(spatial_shapes, Tensor) and _is_exporting():
        return [(spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]) for lvl in range(spatial_shapes.shape[0])]
    if torch.compiler.is_exporting():  # torch.export: (H, W) are SymInts; int() would fix the example's sizes
        return [tuple(hw) for hw in spatial_shapes]
    return _shapes_as_ints(spatial_shapes)


def _shapes_as_tensor(spatial_shapes: SpatialShapes, device: torch.device) -> Tensor:
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(device=device, dtype=torch.long)
    if torch.compiler.is_exporting():  # SymInt sizes: torch.as_tensor would fix them, torch.full keeps them symbolic
        rows = [torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in hw]) for hw in spatial_shapes]
        return torch.stack(rows)
    return torch.as_tensor(list(spatial_shapes), dtype=torch.long, device=device).view(-1, 2)


def _grid_sample_core(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Reference: one ``F.grid_sample`` per level. Shapes as in :func:`ms_deform_attn_core`."""
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(level_sizes(spatial_shapes)):
        value_l = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        start = start + h * w
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, q, n_points, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*M, D, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels * n_points)
    out = (stacked * weights).sum(-1)  # [B*M, D, Q]
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


def _padded_table(value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """Value as rows [B * S' * M, D] (order b, s', m), each level zero-padded by 1 before and 2 after in y and x.

    The zero border stands in for the out-of-map corners, so no per-corner bounds test is needed: a point
    clamped to [-1, size] in pixels keeps its in-map corners and reads zeros for the others.
    """
    b, _, m, d = value.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    padded = [F.pad(v.reshape(b, h, w, m * d), (0, 0, 1, 2, 1, 2)).flatten(1, 2) for v, (h, w) in zip(levels, shapes)]
    return torch.cat(padded, 1).reshape(-1, d)


def _corner_rows_and_weights(
    shapes: list[tuple[int, int]], n_batch: int, locations: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows of the padded table and folded weights (attention x bilinear factor) of the 4 corners per point.

    Args:
        shapes: (H, W) per level.
        n_batch: B.
        locations: [B, Q, M, L, P, 2] normalised (x, y).
        weights: [B, Q, M, L, P].

    Returns:
        rows [B * Q * M, L * P * 4] int32 (int64 for tables beyond 2**31 rows) and weights of the same shape.
    """
    _, q, m, n_levels, n_points, _ = locations.shape
    device, dtype = locations.device, locations.dtype
    padded_sizes = [(h + 3) * (w + 3) for h, w in shapes]
    index_dtype = torch.int32 if n_batch * sum(padded_sizes) * m < 2**31 else torch.long

    def per_point(values: list[int], kind: torch.dtype) -> Tensor:
        # Materialised over [L, P] so that broadcasting only runs over the leading dims (contiguous inner loops).
        return torch.tensor(values, dtype=kind, device=device)[:, None].expand(-1, n_points).contiguous()

    width, height = per_point([w for _, w in shapes], dtype), per_point([h for h, _ in shapes], dtype)
    corner_step = torch.tensor([[0, m, (w + 3) * m, (w + 4) * m] for _, w in shapes], dtype=index_dtype)
    corner_step = corner_step.to(device)[:, None].expand(-1, n_points, 4).contiguous()
    starts = torch.tensor([0, *padded_sizes[:-1]], device=device).cumsum(0)
    base = torch.arange(n_batch, device=device).view(-1, 1, 1) * (sum(padded_sizes) * m)
    base = (base + torch.arange(m, device=device).view(1, -1, 1) + starts * m).to(index_dtype)  # [B, M, L]
    base = base[:, None, :, :, None].expand(-1, 1, -1, -1, n_points).contiguous()

    # Pixel centres at (i + 0.5) / size, rounded like grid_sample's CPU kernel ((g + 1) * size / 2 - 0.5 on
    # g = 2 * loc - 1) so the two kernels agree to float32 rounding; clamping to [-1, size] keeps every
    # in-map corner (zero border).
    grid = 2 * locations - 1
    x = torch.clamp((grid[..., 0] + 1) * (width / 2) - 0.5, min=-torch.ones_like(width), max=width)
    y = torch.clamp((grid[..., 1] + 1) * (height / 2) - 0.5, min=-torch.ones_like(height), max=height)
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = x - x0, y - y0
    y1_weight = weights * fy
    y0_weight = weights - y1_weight
    corner11 = y1_weight * fx
    corner01 = y0_weight * fx
    folded = torch.stack([y0_weight - corner01, corner01, y1_weight - corner11, corner11], -1)
    with torch.no_grad():
        cell = torch.addcmul(x0 + 1, y0 + 1, width + 3).to(index_dtype)  # exact: far fewer than 2**24 cells
        rows = (base + cell * m)[..., None] + corner_step
    return rows.view(n_batch * q * m, -1), folded.view(n_batch * q * m, -1)


def _row_dots(grad_out: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """dots[n, k] = <grad_out[n], table[rows[n, k]]>: the gradient of the weighted row sum w.r.t. its weights.

    On CPU a sampled dense-dense product (``torch.sparse.sampled_addmm`` at the N x K positions) computes it about
    4x faster than embedding_bag's own per-sample-weights backward; elsewhere that backward is used.
    """
    n, k = rows.shape
    if grad_out.device.type == "cpu":
        index_dtype = rows.dtype if n * k < 2**31 else torch.long  # int32 rows: no int64 copy of the indices
        crow = torch.arange(0, n * k + 1, k, dtype=index_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta": only its dense values are used
            cols, values = rows.reshape(-1).to(index_dtype), grad_out.new_zeros(n * k)
            positions = torch.sparse_csr_tensor(crow, cols, values, (n, table.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(positions, grad_out, table.t(), beta=0.0).values().view(n, k)
    with torch.enable_grad():
        leaf = grad_out.new_zeros(n, k).requires_grad_()
        out = F.embedding_bag(rows, table.detach(), per_sample_weights=leaf, mode="sum")
        return torch.autograd.grad(out, leaf, grad_out)[0]


class _WeightedRows(torch.autograd.Function):
    """out[n] = sum_k weights[n, k] * table[rows[n, k]] over the 4 corners k of each of the L * P points.

    ``F.embedding_bag`` computes this without materialising the [N, K, D] rows. Its own table gradient sorts
    all N * K indices; the corners of a point sit at fixed row steps from its first corner, so sorting the
    points alone (4x fewer keys) and shifting the 4 per-corner sums per level gives the same gradient.
    """

    @staticmethod
    def forward(
        ctx, table: Tensor, rows: Tensor, weights: Tensor, segments: list[tuple[int, int, list[int]]]
    ) -> Tensor:
        ctx.save_for_backward(table, rows, weights)
        ctx.segments = segments
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        table, rows, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            n_points = rows.shape[1] // 4
            keys, order = rows.view(-1, 4)[:, 0].sort()
            counts = torch.bincount(keys, minlength=table.shape[0])
            offsets = counts.cumsum(0) - counts
            samples = torch.div(order, n_points, rounding_mode="floor")
            corner_weights = weights.view(-1, 4)[order].t()
            sums = [
                F.embedding_bag(samples, grad_out, offsets, mode="sum", per_sample_weights=w) for w in corner_weights
            ]
            grad_table = sums[0]
            per_batch = grad_table.view(-1, ctx.segments[-1][1], grad_table.shape[-1])
            for start, end, steps in ctx.segments:
                for corner_sum, step in zip(sums[1:], steps):
                    source = corner_sum.view_as(per_batch)[:, start : end - step]
                    per_batch[:, start + step : end] += source
        if ctx.needs_input_grad[2]:
            grad_weights = _row_dots(grad_out, table, rows)
        return grad_table, None, grad_weights, None


def _gather_core(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Fast path: one weighted gather-sum over the padded value table. Shapes as in :func:`ms_deform_attn_core`."""
    b, _, m, d = value.shape
    q = sampling_locations.shape[1]
    shapes = _shapes_as_ints(spatial_shapes)
    table = _padded_table(value, shapes)
    rows, weights = _corner_rows_and_weights(shapes, b, sampling_locations, attention_weights)
    if value.device.type in _FUSED_DEVICES:
        # Row ranges of the levels within one image's block of the table, and each level's corner steps.
        bounds = torch.tensor([0] + [(h + 3) * (w + 3) * m for h, w in shapes]).cumsum(0).tolist()
        segments = [(a, z, [m, (w + 3) * m, (w + 4) * m]) for a, z, (_, w) in zip(bounds, bounds[1:], shapes)]
        out = _WeightedRows.apply(table, rows, weights, segments)
    else:
        out = (weights.unsqueeze(-2) @ table[rows]).squeeze(-2)
    return out.view(b, q, m * d)


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    kernel: str = "gather",
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    Equal to ``F.grid_sample(align_corners=False, padding_mode='zeros')`` of each level at ``2 * loc - 1``.

    Args:
        value: [B, S, M, D], levels flattened row-major and concatenated (level 0 first), S = sum H_l * W_l.
        spatial_shapes: [L, 2] int64 (H, W) per level, or a list of (H, W) ints.
        sampling_locations: [B, Q, M, L, P, 2] normalised (x, y); pixel centres at (i + 0.5) / size,
            points outside [0, 1] read zeros.
        attention_weights: [B, Q, M, L, P] (already softmaxed over L * P).
        kernel: 'gather' (fast, default) or 'grid_sample' (reference). Exporting always uses 'grid_sample'.

    Returns:
        [B, Q, M * D], heads concatenated head-major, in value's dtype.
    """
    if kernel not in MSDA_KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {MSDA_KERNELS}")
    out_dtype = value.dtype
    # Sample in float32 at least: bf16 coordinates are off by a large fraction of a pixel (module docstring).
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), torch.float32)
    with torch.autocast(device_type=value.device.type, enabled=False):
        args = (value.to(dtype), sampling_locations.to(dtype), attention_weights.to(dtype))
        if kernel == "grid_sample" or _is_exporting():
            out = _grid_sample_core(args[0], spatial_shapes, args[1], args[2])
        else:
            out = _gather_core(args[0], spatial_shapes, args[1], args[2])
    return out.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the published parameter names.

    Args:
        d_model: C, divisible by n_heads.
        n_levels: L feature levels.
        n_heads: M heads.
        n_points: P sampling points per head and level.
        kernel: core kernel, 'gather' (default) or 'grid_sample' (reference); may be changed on the instance.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, kernel: str = "gather"
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        if kernel not in MSDA_KERNELS:
            raise ValueError(f"kernel {kernel!r}: expected one of {MSDA_KERNELS}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.kernel = kernel
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Published init: offsets start on a ring of head directions, P points at radius 1..P (in pixels)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        # In float32 as published: a float64 computation differs by up to 2.6e-6 (DESIGN_DEFORMABLE.md).
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # onto the square's border
        radius = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = direction.view(self.n_heads, 1, 1, 2) * radius
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Tensor | None = None,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to P points per head and level around its reference.

        Args:
            query: [B, Q, C].
            reference_points: [B, Q, L, 2] normalised (x, y), or [B, Q, L, 4] normalised (cx, cy, w, h).
            input_flatten: [B, S, C], levels flattened row-major and concatenated.
            input_spatial_shapes: [L, 2] int64 (H, W) per level, or a list of (H, W).
            input_level_start_index: [L] first index of each level in S (implied by the shapes; kept for
                the published signature).
            input_padding_mask: [B, S] bool, True at padding, or None.

        Returns:
            [B, Q, C].
        """
        b, q, _ = query.shape
        s = input_flatten.shape[1]
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, q, m, n_levels, n_points, 2).float()
        weights = self.attention_weights(query).view(b, q, m, n_levels * n_points).float().softmax(-1)
        weights = weights.view(b, q, m, n_levels, n_points)
        ref = reference_points.float()[:, :, None, :, None, :]  # [B, Q, 1, L, 1, 2 or 4]
        if reference_points.shape[-1] == 2:
            size_wh = _shapes_as_tensor(input_spatial_shapes, query.device).flip(-1).float()
            locations = ref + offsets / size_wh[:, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / n_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn_core(value, input_spatial_shapes, locations, weights, kernel=self.kernel)
        return self.output_proj(out)
