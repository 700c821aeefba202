"""CPU cost of RT-DETRv2 side by side: inference at 640 x 640, batch 1, in five variants, and one training step.

Variants (each in its own subprocess, random weights of ``--recipe``): ``eager`` (float32), ``bf16`` (bfloat16
autocast), ``channels_last`` (float32, channels_last backbone and encoder), ``compile`` (``torch.compile`` of the
model, float32) and ``onnxruntime`` (the ONNX export of tools/export_onnx.py run by onnxruntime's CPU provider),
plus ``train``: forward with denoising, the VFL criterion in float32, backward and an AdamW step (batch
``--train_batch``, 5 objects per image). Times are medians of the wall-clock time per call after ``--warmup`` calls,
ratios against ``eager``. Peak memory: the process's peak resident set (VmHWM, reset after building the model)
minus the resident set before the timed calls, in MiB.

    python benchmarks/bench_rtdetr.py --recipe rtdetrv2_r18vd --iters 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed_common import ROOT, format_info, machine_info, markdown_table, reset_peak_rss, rss_kib

VARIANTS = ("eager", "bf16", "channels_last", "compile", "onnxruntime", "train")


def _build(recipe: str, size: int):
    """(model, criterion) of ``recipe`` (a hub entry name) with random weights, 80 classes, eval anchors for
    ``size`` x ``size`` (640: the published buffers)."""
    import models
    from main import get_args_parser

    args = get_args_parser().parse_args(["--model", "rtdetrv2", "--backbone_weights", "none", "--device", "cpu"])
    for key, value in models.FAMILIES["rtdetrv2"].hub_recipes[recipe].items():
        setattr(args, key, value)
    args.eval_spatial_size = [size, size]
    model, criterion, _ = models.build_model(args, 80)
    return model, criterion


def _step_function(variant: str, opts: argparse.Namespace):
    """A no-argument callable running one timed call of ``variant``."""
    import torch

    torch.manual_seed(0)
    model, criterion = _build(opts.recipe, opts.size)
    size = opts.size
    if variant == "train":
        model.train()
        images = torch.rand(opts.train_batch, 3, size, size)
        targets = [{"labels": torch.randint(0, 80, (5,)), "boxes": torch.rand(5, 4) * 0.4 + 0.2}
                   for _ in range(opts.train_batch)]  # fmt: skip
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def train_step() -> None:
            outputs = model(images, targets)
            losses = criterion(outputs, targets)
            loss = sum(losses[k] * criterion.weight_dict[k] for k in losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return train_step
    model.eval()
    images = torch.rand(1, 3, size, size)
    if variant == "onnxruntime":
        import onnxruntime

        from tools.export_onnx import export_onnx

        path = export_onnx(model, Path(tempfile.mkdtemp()) / "rtdetr.onnx", size, size)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = opts.threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}
        return lambda: session.run(None, feed)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if variant == "compile":
        model = torch.compile(model)

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=variant == "bf16"):
            model(images)

    return infer


def run(variant: str, opts: argparse.Namespace) -> dict:
    """Time ``opts.warmup + opts.iters`` calls of ``variant`` in this process."""
    step = _step_function(variant, opts)
    base_rss = rss_kib("VmRSS")
    can_reset = reset_peak_rss()
    times = []
    for _ in range(opts.warmup + opts.iters):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    return {
        "variant": variant,
        "median_s": statistics.median(times[opts.warmup :]),
        "min_s": min(times[opts.warmup :]),
        "peak_mib": (rss_kib("VmHWM") - base_rss) / 1024 if can_reset else float("nan"),
    }


def _run_child(variant: str, opts: argparse.Namespace, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--_child", variant]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(opts.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "error": reason[:200]}
    return json.loads(lines[-1][len("RESULT ") :])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RT-DETRv2 CPU benchmark")
    parser.add_argument("--recipe", default="rtdetrv2_r18vd", help="hub recipe name (random weights)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--size", type=int, default=640, help="square image side (a multiple of 32)")
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = get_args_parser().parse_args(argv)
    if opts._child:
        import torch

        torch.set_num_threads(opts.threads)
        print("RESULT " + json.dumps(run(opts._child, opts)))
        return []
    variants = [v for v in opts.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]}; expected some of {VARIANTS}")
    results = [_run_child(v, opts, argv) for v in variants]
    eager = next((r["median_s"] for r in results if r["variant"] == "eager" and "median_s" in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], "failed", "", "", r["error"]])
            continue
        ratio = f"{r['median_s'] / eager:.2f}x" if eager and r["variant"] != "train" else ""
        rows.append([r["variant"], f"{r['median_s'] * 1000:.0f}", f"{r['min_s'] * 1000:.0f}", ratio,
                     f"{r['peak_mib']:.0f}"])  # fmt: skip
    print(format_info(machine_info()))
    print(f"{opts.recipe}, {opts.size}x{opts.size}, inference batch 1, train batch {opts.train_batch}, "
          f"{opts.threads} threads, median of {opts.iters} after {opts.warmup} warm-up calls")  # fmt: skip
    print(markdown_table(["variant", "median ms", "min ms", "vs eager", "peak MiB"], rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
