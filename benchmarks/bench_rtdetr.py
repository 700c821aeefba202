"""Cost of RT-DETRv2 side by side (CPU; ``--device cuda`` on a GPU): inference at 640 x 640, batch 1, in eight
variants, and one training step.

Variants (each in its own subprocess, random weights of ``--recipe``): ``eager`` (float32), ``deploy``
(``models.deploy.prepare_for_inference``: folded batch norms, merged RepVGG branches, channels_last; float32),
``hf`` (HF transformers' ``RTDetrV2ForObjectDetection``, a port of the published model, loaded with the same weights
through ``interop.hf_folder.checkpoint_to_hf_folder``; float32), ``hf_deploy`` (that port with its RepVGG blocks
merged into one 3x3 conv each, which is all the published model's ``deploy()`` changes: the stand-in for the
published inference model; its outputs are checked against ``hf``), ``bf16`` (bfloat16 autocast), ``channels_last``
(float32, channels_last backbone and encoder), ``compile`` (``torch.compile`` of the model, float32) and
``onnxruntime`` (the ONNX export of tools/export_onnx.py run by onnxruntime's CPU provider), plus ``train``: forward
with denoising, the VFL criterion in float32, backward and an AdamW step (batch ``--train_batch``, 5 objects per
image). Times are medians of the wall-clock time per call after ``--warmup`` calls, ratios against ``eager``,
``hf`` and ``hf_deploy``. Peak memory: the process's peak resident set (VmHWM, reset after building the model)
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

VARIANTS = ("eager", "deploy", "hf", "hf_deploy", "bf16", "channels_last", "compile", "onnxruntime", "train")
BASELINES = ("eager", "hf", "hf_deploy")


def _build(recipe: str, size: int):
    """(model, criterion, args) of ``recipe`` (a hub entry name) with random weights, 80 classes, eval anchors for
    ``size`` x ``size`` (640: the published buffers)."""
    import models
    from main import get_args_parser

    args = get_args_parser().parse_args(["--model", "rtdetrv2", "--backbone_weights", "none", "--device", "cpu"])
    for key, value in models.FAMILIES["rtdetrv2"].hub_recipes[recipe].items():
        setattr(args, key, value)
    args.eval_spatial_size = [size, size]
    args.num_classes = 80
    model, criterion, _ = models.build_model(args, 80)
    return model, criterion, args


def _hf_model(model, args):
    """HF ``RTDetrV2ForObjectDetection`` holding ``model``'s weights (written and read back as an HF folder)."""
    import transformers

    from interop.hf_folder import checkpoint_to_hf_folder

    with tempfile.TemporaryDirectory() as scratch:  # ~80-170 MB of weights, read back into memory
        folder = checkpoint_to_hf_folder({"model": model.state_dict(), "args": vars(args)}, scratch)
        return transformers.RTDetrV2ForObjectDetection.from_pretrained(folder).eval()


def _merge_hf_repvgg(hf_model):
    """``hf_model`` with every RepVGG block (3x3 conv + BN plus 1x1 conv + BN, summed) replaced by one biased 3x3 conv
    and its activation, as the published ``RepVggBlock.convert_to_deploy`` does. Each merged block must give its
    block's output on a random input within 1e-4 (relative to its largest value); the whole model's outputs are not
    compared, because with random weights the top-K query selection flips on float rounding."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from models.deploy import fold_conv_norm

    class MergedRepVgg(nn.Module):
        def __init__(self, block: nn.Module):
            super().__init__()
            weight3, bias3 = fold_conv_norm(block.conv1.conv, block.conv1.norm)
            weight1, bias1 = fold_conv_norm(block.conv2.conv, block.conv2.norm)
            self.conv = nn.Conv2d(weight3.shape[1], weight3.shape[0], 3, 1, padding=1).to(weight3)
            with torch.no_grad():
                self.conv.weight.copy_(weight3 + F.pad(weight1, [1, 1, 1, 1]))
                self.conv.bias.copy_(bias3 + bias1)
            self.activation = block.activation

        def forward(self, x):
            return self.activation(self.conv(x))

    blocks = [(name, m) for name, m in hf_model.named_modules() if type(m).__name__.endswith("RepVggBlock")]
    if not blocks:
        raise RuntimeError("no RepVggBlock in the HF model")
    with torch.no_grad():
        for name, block in blocks:
            merged = MergedRepVgg(block)
            x = torch.randn(1, block.conv1.conv.in_channels, 12, 12, generator=torch.Generator().manual_seed(0))
            expected = block(x.to(merged.conv.weight))
            diff = (merged(x.to(merged.conv.weight)) - expected).abs().max().item()
            if diff > 1e-4 * max(expected.abs().max().item(), 1.0):
                raise RuntimeError(f"merged RepVGG block {name} differs by {diff:.2e}")
            parent_name, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent_name), child, merged)
    return hf_model


def _step_function(variant: str, opts: argparse.Namespace):
    """A no-argument callable running one timed call of ``variant``."""
    import torch

    torch.manual_seed(0)
    device = torch.device(opts.device)
    model, criterion, args = _build(opts.recipe, opts.size)
    model, criterion = model.to(device), criterion.to(device)
    size = opts.size
    if variant == "train":
        model.train()
        images = torch.rand(opts.train_batch, 3, size, size, device=device)
        targets = [{"labels": torch.randint(0, 80, (5,), device=device),
                    "boxes": torch.rand(5, 4, device=device) * 0.4 + 0.2} for _ in range(opts.train_batch)]  # fmt: skip
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
    images = torch.rand(1, 3, size, size, device=device)
    if variant == "onnxruntime":
        if device.type != "cpu":
            raise SystemExit("onnxruntime: CPU provider only (run it with --device cpu)")
        import onnxruntime

        from tools.export_onnx import export_onnx

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = opts.threads
        with tempfile.TemporaryDirectory() as scratch:  # the session holds the graph once it is built
            path = export_onnx(model, Path(scratch) / "rtdetr.onnx", size, size)
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}
        return lambda: session.run(None, feed)
    if variant in ("hf", "hf_deploy"):
        hf_model = _hf_model(model, args).to(device)
        if variant == "hf_deploy":
            hf_model = _merge_hf_repvgg(hf_model)

        @torch.no_grad()
        def infer_hf() -> None:
            hf_model(pixel_values=images)

        return infer_hf
    if variant == "deploy":
        from models.deploy import prepare_for_inference

        model = prepare_for_inference(model)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if variant == "compile":
        model = torch.compile(model)

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=variant == "bf16"):
            model(images)

    return infer


def run(variant: str, opts: argparse.Namespace) -> dict:
    """Time ``opts.warmup + opts.iters`` calls of ``variant`` in this process."""
    import torch

    step = _step_function(variant, opts)
    cuda = opts.device.startswith("cuda")
    base_rss = rss_kib("VmRSS")
    can_reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(opts.warmup + opts.iters):
        tic = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    if cuda:  # GPU memory: the peak allocated by the timed calls
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (rss_kib("VmHWM") - base_rss) / 1024 if can_reset else float("nan")
    return {
        "variant": variant,
        "median_s": statistics.median(times[opts.warmup :]),
        "min_s": min(times[opts.warmup :]),
        "peak_mib": peak,
    }


def run_paired(variants: list[str], opts: argparse.Namespace) -> list[dict]:
    """Time the inference ``variants`` in one process, one call of each per round (rotating order).

    On a shared machine the load drifts between separate runs; calls that alternate see the same load, so the
    median over rounds of each round's time ratio is the steadier comparison.
    """
    import torch

    steps = {v: _step_function(v, opts) for v in variants}
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(opts.warmup + opts.iters):
        shift = i % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            tic = time.perf_counter()
            steps[variant]()
            sync()
            times[variant].append(time.perf_counter() - tic)
    timed = {v: t[opts.warmup :] for v, t in times.items()}
    results = []
    for variant, values in timed.items():
        row = {"variant": variant, "median_s": statistics.median(values), "min_s": min(values)}
        for base in BASELINES:
            if base in timed:
                row[f"vs_{base}"] = statistics.median(a / b for a, b in zip(values, timed[base]))
        results.append(row)
    return results


def _run_child(variant: str, opts: argparse.Namespace, argv: list[str]) -> dict | list[dict]:
    cmd = [sys.executable, __file__, *argv, "--_child", variant]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(opts.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if variant == "paired":
            return [{"variant": v, "error": reason[:200]} for v in opts.paired.split(",")]
        return {"variant": variant, "error": reason[:200]}
    return json.loads(lines[-1][len("RESULT ") :])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RT-DETRv2 inference and train-step benchmark")
    parser.add_argument("--recipe", default="rtdetrv2_r18vd", help="hub recipe name (random weights)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--size", type=int, default=640, help="square image side (a multiple of 32)")
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak MiB: resident set on cpu, allocated "
                        "GPU memory on cuda; onnxruntime is cpu only)")  # fmt: skip
    parser.add_argument("--paired", default="", help="also time these inference variants alternating in one "
                        "process, e.g. eager,deploy,hf (steadier ratios under a drifting load)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = get_args_parser().parse_args(argv)
    if opts._child:
        import torch

        torch.set_num_threads(opts.threads)
        if opts._child == "paired":
            print("RESULT " + json.dumps(run_paired(opts.paired.split(","), opts)))
        else:
            print("RESULT " + json.dumps(run(opts._child, opts)))
        return []
    variants = [v for v in opts.variants.split(",") if v]
    paired = [v for v in opts.paired.split(",") if v]
    unknown = sorted(set(variants + paired) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]}; expected some of {VARIANTS}")
    if "train" in paired:
        raise SystemExit("error: --paired compares inference variants; train cannot be one of them")
    info = machine_info()
    results = [_run_child(v, opts, argv) for v in variants]
    paired_results = _run_child("paired", opts, argv) if paired else []
    if hasattr(os, "getloadavg"):
        info["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    def baseline(name: str) -> float | None:
        return next((r["median_s"] for r in results if r["variant"] == name and "median_s" in r), None)

    bases = [baseline(name) for name in BASELINES]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], "failed", "", *[""] * len(BASELINES), r["error"]])
            continue
        inference = r["variant"] != "train"
        ratios = [f"{r['median_s'] / base:.2f}x" if base and inference else "" for base in bases]
        rows.append([r["variant"], f"{r['median_s'] * 1000:.0f}", f"{r['min_s'] * 1000:.0f}", *ratios,
                     f"{r['peak_mib']:.0f}"])  # fmt: skip
    print(format_info(info))
    print(f"{opts.recipe}, {opts.size}x{opts.size}, {opts.device}, inference batch 1, train batch {opts.train_batch}, "
          f"{opts.threads} threads, median of {opts.iters} after {opts.warmup} warm-up calls")  # fmt: skip
    vs = [f"vs {name}" for name in BASELINES]
    print(markdown_table(["variant", "median ms", "min ms", *vs, "peak MiB"], rows))
    if paired_results:
        print(f"\nalternating in one process ({', '.join(paired)}), median over rounds of the per-round ratio:")
        rows = []
        for r in paired_results:
            if "error" in r:
                rows.append([r["variant"], "failed", "", *[""] * (len(BASELINES) - 1), r["error"]])
                continue
            ratios = [f"{r[f'vs_{k}']:.2f}x" if f"vs_{k}" in r else "" for k in BASELINES]
            rows.append([r["variant"], f"{r['median_s'] * 1000:.0f}", f"{r['min_s'] * 1000:.0f}", *ratios])
        print(markdown_table(["variant", "median ms", "min ms", *vs], rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"separate": results, "paired": paired_results}, indent=1))
    return results + paired_results


if __name__ == "__main__":
    main()
