"""Train-step and inference speed of DETR variants, side by side in one run.

For each model config (R50 published at ~800x1066 and 512x683, batch 2, and the demo config) and each variant
(reference-math float32 attention, fused SDPA attention, AMP bf16, torch.compile, channels_last, all together)
this measures: train-step time (forward + loss + backward + AdamW step with the published clipping), images/s,
peak memory, inference images/s (forward + PostProcess), and the loss at the initial weights (a correctness
check: every float32 variant must give the same loss, bf16 a close one).

Times: on CPU the median of the process's CPU time per step (``time.process_time``; run with ``--threads 1``
it is the compute of one core, unaffected by other jobs sharing the machine, which can stretch wall time
several-fold), with the wall-clock median beside it; on CUDA, wall time after synchronising.
Every (config, variant) pair runs in its own subprocess, so peak memory, thread pools and compile caches do not
leak between variants. Warm-up iterations (which include compilation) are excluded from the timings; the first
warm-up step minus the steady step time estimates the compile time.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over building, warm-up and timed steps. On CPU there is
no allocator counter, so it is the process's peak resident set (``VmHWM`` of /proc/self/status, reset through
/proc/self/clear_refs after the imports) minus the resident set after the imports: parameters, gradients,
optimizer state, peak activations, allocator slack and, with --compile, the compiler's own memory.

    python benchmarks/bench_train.py --configs r50_512 --iters 5
    python benchmarks/bench_train.py --configs r50_800,demo --variants math,sdpa,bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speed_common import ROOT, format_info, machine_info, markdown_table, reset_peak_rss, rss_kib

VARIANTS: dict[str, dict] = {
    "math": dict(attention="math"),  # the reference: plain softmax attention, float32
    "sdpa": dict(),
    "bf16": dict(amp="bf16"),
    "compile": dict(compile=True),
    "channels_last": dict(channels_last=True),
    "bf16_cl": dict(amp="bf16", channels_last=True),
    "all": dict(amp="bf16", compile=True, channels_last=True),
}
# Published R50: every default of main.py except the offline backbone.
R50_FLAGS = ["--backbone", "resnet50", "--backbone_weights", "none", "--num_classes", "91"]
# The published Deformable DETR / DINO R50 recipes (their family defaults), as configs '<family>_512' / '_800'.
FAMILY_CONFIGS = {
    "deformable": (["--model", "deformable_detr"], "Deformable DETR R50 multi-scale"),
    "deformable_two_stage": (["--model", "deformable_detr", "--with_box_refine", "--two_stage"],
                             "Deformable DETR R50 + refine + two-stage"),
    "dino": (["--model", "dino"], "DINO R50 4-scale (100 dn queries)"),
}  # fmt: skip
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
# Used while configs/demo.yaml does not exist: a small ResNet-18 model.
DEMO_FALLBACK_FLAGS = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "128", "--nheads", "8",
    "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "512", "--num_queries", "50",
    "--num_classes", "91", "--input_scale", "0.4",
]  # fmt: skip


def _config(name: str) -> tuple[list[str], list[tuple[int, int]], str]:
    """(main.py flags, per-image (h, w) sizes of one batch, description) of a benchmark config."""
    if name == "r50_800":
        return R50_FLAGS, [(800, 1066), (800, 1002)], "R50 published, batch 2, 800x1066 + 800x1002"
    if name == "r50_512":
        return R50_FLAGS, [(512, 683), (512, 619)], "R50 published, batch 2, 512x683 + 512x619"
    family, _, size = name.rpartition("_")
    if family in FAMILY_CONFIGS and size in ("512", "800"):
        flags, description = FAMILY_CONFIGS[family]
        sizes = [(800, 1066), (800, 1002)] if size == "800" else [(512, 683), (512, 619)]
        return [*R50_FLAGS, *flags], sizes, f"{description}, batch 2, {sizes[0][0]}x{sizes[0][1]} + ..x{sizes[1][1]}"
    if name == "demo":
        from cli.config import parse_args_with_config
        from main import get_args_parser

        if DEMO_CONFIG.is_file():
            flags = ["--config", str(DEMO_CONFIG), "--backbone_weights", "none"]
            args = parse_args_with_config(get_args_parser(), flags)
            source = "configs/demo.yaml"
        else:
            flags = DEMO_FALLBACK_FLAGS
            args = get_args_parser().parse_args(flags)
            source = "resnet18 fallback (no configs/demo.yaml)"
        # The middle of the published training scales (short side 480..800), times --input_scale.
        height, width = round(640 * args.input_scale), round(853 * args.input_scale)
        sizes = [(height, width)] * args.batch_size
        return flags, sizes, f"demo ({source}), batch {args.batch_size}, {height}x{width}"
    families = ", ".join(f"{f}_512, {f}_800" for f in FAMILY_CONFIGS)
    raise SystemExit(f"error: unknown config {name!r}; choose from r50_800, r50_512, demo, {families}")


def _make_batch(sizes: list[tuple[int, int]], num_classes: int, boxes_per_image: int = 7):
    """Random normalised images and targets ('labels', 'boxes' normalised cxcywh, 'orig_size', 'size')."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for h, w in sizes:
        images.append(torch.randn(3, h, w, generator=generator))
        centers = 0.2 + 0.6 * torch.rand(boxes_per_image, 2, generator=generator)
        extents = 0.05 + 0.35 * torch.rand(boxes_per_image, 2, generator=generator)
        labels = torch.randint(1, num_classes, (boxes_per_image,), generator=generator)
        size = torch.tensor([h, w])
        targets.append({"labels": labels, "boxes": torch.cat([centers, extents], 1), "orig_size": size, "size": size})
    return images, targets


def run_variant(config: str, variant: str, iters: int, warmup: int, infer_iters: int, device_name: str) -> dict:
    """Build, check, time inference and training of one (config, variant); returns the measurements."""
    import torch

    import models
    from cli.config import parse_args_with_config
    from main import build_optimizer, get_args_parser
    from util.acceleration import apply_channels_last, compile_model
    from util.amp import autocast_context, make_grad_scaler, optimizer_step
    from util.misc import nested_tensor_from_tensor_list

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # On a shared CPU the process's CPU time is far steadier than wall time (see the module docstring).
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    options = VARIANTS[variant]
    flags, sizes, _ = _config(config)
    flags = [*flags, "--device", device_name, "--attention", options.get("attention", "sdpa")]
    args = parse_args_with_config(get_args_parser(), flags)
    amp = options.get("amp", "off")

    base_rss = rss_kib("VmRSS")
    can_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, criterion, postprocessors = models.build_model(args)  # 91 classes unless the config names a count
    model.to(device)
    criterion.to(device)
    if options.get("channels_last"):
        apply_channels_last(model)
    if options.get("compile"):
        compile_model(model)
    images, targets = _make_batch(sizes, args.num_classes)
    samples = nested_tensor_from_tensor_list(images).to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    orig_sizes = torch.stack([t["orig_size"] for t in targets])
    weights = criterion.weight_dict

    def weighted_loss(outputs) -> torch.Tensor:
        loss_dict = criterion(outputs, targets)
        return sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)

    # Inference: first the loss at the initial weights (correctness check, and the eval-graph warm-up).
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(1 + infer_iters):
            tic = clock()
            with autocast_context(device.type, amp):
                outputs = model(samples)
                postprocessors["bbox"](outputs, orig_sizes)
            sync()
            times.append(clock() - tic)
            if i == 0:
                initial_loss = float(weighted_loss(outputs))
    infer_step = statistics.median(times[1:]) if infer_iters else float("nan")

    model.train()
    optimizer = build_optimizer(model, args)
    scaler = make_grad_scaler(amp, device.type)
    step_times, wall_times = [], []
    for _ in range(warmup + iters):
        tic, wall_tic = clock(), time.perf_counter()
        with autocast_context(device.type, amp):
            # DINO's denoising queries are built from the targets (the training loop passes them too).
            outputs = model(samples, targets) if getattr(model, "needs_targets", False) else model(samples)
            loss = weighted_loss(outputs)
        optimizer_step(loss, optimizer, scaler, args.clip_max_norm)
        sync()
        step_times.append(clock() - tic)
        wall_times.append(time.perf_counter() - wall_tic)
    steady = step_times[warmup:]
    step = statistics.median(steady)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (rss_kib("VmHWM") - base_rss) / 1024 if can_reset else float("nan")
    return {
        "config": config,
        "variant": variant,
        "batch": len(sizes),
        "clock": "process CPU time" if device.type == "cpu" else "wall",
        "step_s": step,
        "step_min_s": min(steady),
        "step_max_s": max(steady),
        "step_wall_s": statistics.median(wall_times[warmup:]),
        "first_step_wall_s": wall_times[0],
        "images_per_s": len(sizes) / step,
        "peak_mib": peak_mib,
        "infer_images_per_s": len(sizes) / infer_step,
        "initial_loss": initial_loss,
        "final_loss": float(loss.detach()),
    }


def _child_main(argv: list[str]) -> None:
    config, variant, iters, warmup, infer_iters, device, threads = argv
    if int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    result = run_variant(config, variant, int(iters), int(warmup), int(infer_iters), device)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(config: str, variant: str, opts: argparse.Namespace) -> dict:
    warmup = opts.warmup + (1 if VARIANTS[variant].get("compile") else 0)  # compile needs forward+backward graphs
    cmd = [sys.executable, __file__, "--_child", config, variant, str(opts.iters), str(warmup), str(opts.infer_iters)]
    cmd += [opts.device, str(opts.threads)]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - tic
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"  {config}/{variant} failed (exit {proc.returncode}): " + " | ".join(tail), flush=True)
        return {"config": config, "variant": variant, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = wall
    print(f"  {config}/{variant}: {result['step_s']:.3f} s/step ({wall:.0f} s wall)", flush=True)
    return result


def _table(results: list[dict]) -> str:
    header = [
        "config", "variant", "train s/step (min-max)", "x ref time", "wall s/step", "train img/s", "peak MiB",
        "infer img/s", "x ref infer", "first step wall s", "loss@init",
    ]  # fmt: skip
    rows = []
    refs = {x["config"]: x for x in results if x["variant"] == "math" and "error" not in x}
    for r in results:
        if "error" in r:
            rows.append([r["config"], r["variant"], f"failed: {r['error']}"] + [""] * (len(header) - 3))
            continue
        ref = refs.get(r["config"])
        ratio = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        infer_ratio = f"{r['infer_images_per_s'] / ref['infer_images_per_s']:.2f}" if ref else "-"
        rows.append([
            r["config"], r["variant"], f"{r['step_s']:.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f})", ratio,
            f"{r['step_wall_s']:.3f}", f"{r['images_per_s']:.2f}", f"{r['peak_mib']:.0f}",
            f"{r['infer_images_per_s']:.2f}", infer_ratio, f"{r['first_step_wall_s']:.1f}", f"{r['initial_loss']:.5f}",
        ])  # fmt: skip
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="r50_512,r50_800,demo", help="comma list of r50_512, r50_800, demo")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--iters", default=5, type=int, help="timed training steps per variant")
    parser.add_argument("--warmup", default=1, type=int, help="untimed training steps (+1 for compiled variants)")
    parser.add_argument("--infer_iters", default=3, type=int, help="timed inference batches per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", default=0, type=int, help="torch CPU threads per variant (0: torch's default, one per core)"
    )
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    opts = parser.parse_args(argv)
    variants = opts.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)  # so that machine_info reports the count the variants use
    print(format_info(machine_info()), flush=True)
    results = []
    for config in opts.configs.split(","):
        print(f"{config}: {_config(config)[2]}", flush=True)
        results += [_run_child(config, variant, opts) for variant in variants]
    print(_table(results))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child_main(sys.argv[2:])
    else:
        main()
