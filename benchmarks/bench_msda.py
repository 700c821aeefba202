"""Forward+backward time and peak memory of the multi-scale deformable attention core: 'gather' vs 'grid_sample'.

R50 Deformable DETR sizes: an 800x1066 input gives levels (100, 134), (50, 67), (25, 34), (13, 17) at strides
8..64; batch 2, 8 heads of 32, 4 levels, 4 points. The encoder case has one query per token (Q = S = 17,821),
the decoder case 300 queries. ``--scale`` shrinks the input side for slow machines (the measured level sizes
are printed). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS increase of one
forward+backward in a fresh subprocess per kernel.

    python benchmarks/bench_msda.py --repeats 3
    python benchmarks/bench_msda.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ms_deform_attn import MSDA_KERNELS, MSDeformAttn, ms_deform_attn_core  # noqa: E402


def level_shapes(scale: float) -> list[tuple[int, int]]:
    """(H, W) of the 4 levels at strides 8, 16, 32, 64 for an (800, 1066) * scale input."""
    height, width = round(800 * scale), round(1066 * scale)
    return [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32, 64)]


def make_inputs(case: str, args: argparse.Namespace) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """Seeded value [B, S, M, D], locations [B, Q, M, L, P, 2] and softmaxed weights [B, Q, M, L, P].

    Locations as in a trained model: the reference point (encoder: each token's cell centre in raster order;
    decoder: uniform in [0, 1]) plus offsets of a few pixels per level around the published init ring, so
    the memory access pattern (locality, points past the border) is realistic.
    """
    shapes = level_shapes(args.scale)
    s = sum(h * w for h, w in shapes)
    q = s if case == "encoder" else args.queries
    b, m, d, n_levels, p = args.batch, 8, 32, len(shapes), 4
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(b, s, m, d, generator=gen)
    if case == "encoder":
        centres = []
        for h, w in shapes:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        ref = torch.cat(centres).expand(b, q, 2)
    else:
        ref = torch.rand(b, q, 2, generator=gen)
    offsets = MSDeformAttn(d * m, n_levels, m, p).sampling_offsets.bias.detach().view(m, n_levels, p, 2)
    offsets = offsets + 2 * torch.randn(b, q, m, n_levels, p, 2, generator=gen)
    size_wh = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32).view(n_levels, 1, 2)
    locations = ref[:, :, None, None, None, :] + offsets / size_wh
    weights = torch.randn(b, q, m, n_levels * p, generator=gen).softmax(-1).view(b, q, m, n_levels, p)
    tensors = [t.to(args.device).requires_grad_() for t in (value, locations, weights)]
    return shapes, tensors


def step(kernel: str, shapes: list[tuple[int, int]], tensors: list[torch.Tensor], grad: torch.Tensor) -> list:
    """One forward+backward; returns the output and the 3 input gradients."""
    out = ms_deform_attn_core(tensors[0], shapes, tensors[1], tensors[2], kernel=kernel)
    grads = torch.autograd.grad(out, tensors, grad)
    return [out.detach(), *grads]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_kernels(case: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, list]]:
    """Median forward+backward ms per kernel; the kernels alternate so that load from other processes hits both."""
    shapes, tensors = make_inputs(case, args)
    grad = torch.randn(tensors[0].shape[0], tensors[1].shape[1], 256, generator=torch.Generator().manual_seed(1))
    grad = grad.to(args.device)
    kernels = ("grid_sample", "gather")
    results = {k: step(k, shapes, tensors, grad) for k in kernels for _ in range(args.warmup)}
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for repeat in range(args.repeats):
        for kernel in kernels[:: 1 if repeat % 2 == 0 else -1]:
            sync(args.device)
            start = time.perf_counter()
            results[kernel] = step(kernel, shapes, tensors, grad)
            sync(args.device)
            times[kernel].append((time.perf_counter() - start) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}, results


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(kernel: str, case: str, args: argparse.Namespace) -> float:
    """Peak memory of one forward+backward above the inputs, in MiB."""
    if args.device.startswith("cuda"):
        shapes, tensors = make_inputs(case, args)
        grad = torch.randn(tensors[0].shape[0], tensors[1].shape[1], 256, device=args.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(kernel, shapes, tensors, grad)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--rss-child", kernel, "--case", case, "--scale", str(args.scale)]
    cmd += ["--batch", str(args.batch), "--queries", str(args.queries), "--threads", str(args.threads)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def rss_child(args: argparse.Namespace) -> None:
    """Prints the VmHWM increase (MiB) of one forward+backward over the RSS right after creating the inputs."""
    shapes, tensors = make_inputs(args.case, args)
    grad = torch.randn(tensors[0].shape[0], tensors[1].shape[1], 256)
    base = rss_kib("VmRSS:")
    step(args.rss_child, shapes, tensors, grad)
    print((rss_kib("VmHWM:") - base) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="input side factor (1.0 = 800x1066)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300, help="decoder queries")
    parser.add_argument("--case", choices=("encoder", "decoder", "both"), default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rss-child", choices=MSDA_KERNELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    print(f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"levels {level_shapes(args.scale)}, batch {args.batch}, heads 8 x 32, 4 points")
    rows = []
    for case in ("encoder", "decoder") if args.case == "both" else (args.case,):
        ms, results = time_kernels(case, args)
        memory = {k: math.nan if args.no_memory else peak_memory_mib(k, case, args) for k in ms}
        pairs = list(zip(results["gather"], results["grid_sample"]))
        diff = (pairs[0][0] - pairs[0][1]).abs().max().item()
        # Gradients relative to their largest entry: a point exactly on a pixel line (kink of the bilinear
        # map) may legitimately take the other one-sided derivative in either kernel.
        grad_diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs[1:])
        row = {
            "case": case,
            "queries": results["gather"][0].shape[1],
            "grid_sample_ms": ms["grid_sample"],
            "gather_ms": ms["gather"],
            "speedup": ms["grid_sample"] / ms["gather"],
            "grid_sample_peak_mib": memory["grid_sample"],
            "gather_peak_mib": memory["gather"],
            "max_abs_diff": diff,
            "max_rel_grad_diff": grad_diff,
        }
        rows.append(row)
        print(
            f"{case:8s} Q={row['queries']:6d}  grid_sample {row['grid_sample_ms']:9.1f} ms  gather "
            f"{row['gather_ms']:9.1f} ms  speedup {row['speedup']:.2f}x  peak MiB {row['grid_sample_peak_mib']:.0f}"
            f" / {row['gather_peak_mib']:.0f}  max|diff| out {diff:.1e}, grads (relative) {grad_diff:.1e}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
