"""CPU cost of backbones side by side: Swin-T vs ResNet-50 (and any ``timm:NAME``), forward + backward.

Mode ``backbone`` (default): the backbone alone returning the DINO 4-scale levels (strides 8/16/32), random
weights, one random image of ``--size`` px, loss = sum of squares of the returned maps, ``backward()``.
Mode ``full``: one training step of a whole detector (``--model``, default dino) built from the project's
argument parser with ``--backbone NAME --backbone_weights none`` plus ``--flags``: forward, weighted loss,
backward (no optimizer step); any ``--backbone`` name ``models.backbone.build_backbone`` takes.

Times are the median of the process's CPU time per step (``time.process_time``: with ``--threads 1`` the compute
of one core, steady on a shared machine), wall-clock median beside it; every backbone runs in its own subprocess.
Peak memory: the process's peak resident set (VmHWM, reset after the imports) minus the resident set after the
imports: parameters, gradients, activations and allocator slack.

    python benchmarks/bench_backbones.py --backbones resnet50,swin_T_224_1k --size 512 --iters 3
    python benchmarks/bench_backbones.py --mode full --backbones resnet50,swin_T_224_1k --flags "--num_queries 100"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from speed_common import ROOT, format_info, machine_info, markdown_table, reset_peak_rss, rss_kib


def _build_backbone(name: str):
    """The backbone alone with the DINO 4-scale levels (return_interm_indices 1 2 3), random weights."""
    from models.backbone import Backbone
    from models.swin_transformer import SWIN_CONFIGS, build_swin_backbone
    from models.timm_backbone import build_timm_backbone, parse_timm_name

    if name in SWIN_CONFIGS:
        return build_swin_backbone(name, (1, 2, 3))
    if parse_timm_name(name):
        return build_timm_backbone(name, (1, 2, 3))
    return Backbone(
        name,
        train_backbone=True,
        return_interm_layers=False,
        dilation=False,
        weights="none",
        return_interm_indices=[1, 2, 3],
    )


def _full_step(name: str, opts: argparse.Namespace):
    """(model, step function) of one detector training step (forward, weighted loss, backward)."""
    from bench_train import _make_batch

    import models
    from cli.config import parse_args_with_config
    from main import get_args_parser
    from util.misc import nested_tensor_from_tensor_list

    flags = ["--model", opts.model, "--backbone", name, "--backbone_weights", "none", "--device", "cpu"]
    args = parse_args_with_config(get_args_parser(), [*flags, *shlex.split(opts.flags)])
    num_classes = args.num_classes or 91
    model, criterion, _ = models.build_model(args, num_classes)
    model.train()
    images, targets = _make_batch([(opts.size, opts.size)] * opts.batch, num_classes)
    samples = nested_tensor_from_tensor_list(images)

    def step() -> float:
        outputs = model(samples, targets) if getattr(model, "needs_targets", False) else model(samples)
        loss_dict = criterion(outputs, targets)
        loss = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def run(name: str, opts: argparse.Namespace) -> dict:
    """Build ``name`` and time ``opts.warmup + opts.iters`` forward + backward steps."""
    import torch

    from util.misc import NestedTensor

    base_rss = rss_kib("VmRSS")
    can_reset = reset_peak_rss()
    torch.manual_seed(0)
    if opts.mode == "full":
        model, step = _full_step(name, opts)
    else:
        model = _build_backbone(name).train()
        images = torch.randn(opts.batch, 3, opts.size, opts.size)
        samples = NestedTensor(images, torch.zeros(opts.batch, opts.size, opts.size, dtype=torch.bool))

        def step() -> float:
            loss = sum(level.tensors.square().mean() for level in model(samples).values())
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss.detach())

    cpu, wall = [], []
    for _ in range(opts.warmup + opts.iters):
        tic, wall_tic = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - tic)
        wall.append(time.perf_counter() - wall_tic)
    return {
        "backbone": name,
        "mode": opts.mode,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": statistics.median(cpu[opts.warmup :]),
        "step_min_s": min(cpu[opts.warmup :]),
        "step_wall_s": statistics.median(wall[opts.warmup :]),
        "peak_mib": (rss_kib("VmHWM") - base_rss) / 1024 if can_reset else float("nan"),
    }


def _run_child(name: str, opts: argparse.Namespace, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--_child", name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(opts.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        print(f"  {name} failed: {tail[-1]}", flush=True)
        return {"backbone": name, "error": tail[-1]}
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"  {name}: {result['step_s']:.3f} s/step, peak {result['peak_mib']:.0f} MiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones",
        default="resnet50,swin_T_224_1k",
        help="comma list; the first is the ratio reference (resnet*, swin_*, timm:NAME)",
    )
    parser.add_argument("--mode", default="backbone", choices=["backbone", "full"])
    parser.add_argument("--model", default="dino", help="detector family of --mode full")
    parser.add_argument("--flags", default="", help="extra detector flags of --mode full (one quoted string)")
    parser.add_argument("--size", default=512, type=int, help="square image side in px")
    parser.add_argument("--batch", default=1, type=int)
    parser.add_argument("--iters", default=3, type=int, help="timed steps")
    parser.add_argument("--warmup", default=1, type=int, help="untimed steps")
    parser.add_argument("--threads", default=1, type=int, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts._child:
        import torch

        torch.set_num_threads(opts.threads)
        print("RESULT " + json.dumps(run(opts._child, opts)), flush=True)
        return []
    print(format_info(machine_info()), flush=True)
    results = [_run_child(name, opts, argv) for name in opts.backbones.split(",")]
    ok = [r for r in results if "error" not in r]
    ref = ok[0] if ok else None
    rows = [
        [
            r["backbone"],
            f"{r['params_m']:.1f}",
            f"{r['step_s']:.3f} ({r['step_min_s']:.3f})",
            f"{r['step_wall_s']:.3f}",
            f"{r['step_s'] / ref['step_s']:.2f}",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_mib'] / ref['peak_mib']:.2f}",
        ]
        for r in ok
    ]
    what = "backbone forward+backward" if opts.mode == "backbone" else f"{opts.model} train step (no optimizer)"
    print(
        f"\n{what}, {opts.size}x{opts.size} px, batch {opts.batch}, {opts.threads} thread(s), CPU time median of "
        f"{opts.iters} after {opts.warmup} warm-up\n"
    )
    header = ["backbone", "params M", "s/step (min)", "wall s/step", "x time", "peak MiB", "x peak"]
    print(markdown_table(header, rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
