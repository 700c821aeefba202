"""Hungarian matching time: plain per-image matcher vs the batched all-layers matcher, and its share of a step.

Three ways to match every decoder layer of one training step (final output + auxiliary outputs):

- per_image: ``HungarianMatcher.match_per_image`` for each layer (one cost matrix, one host copy and one
  solver call per image and layer);
- flat_per_layer: per layer one [B*Q, sum T] cost matrix over all images (cross-image blocks computed and
  thrown away), one host copy per layer, split per image (the published approach, written here from its
  description as a baseline);
- batched: ``HungarianMatcher.match_layers`` (per-image blocks padded to the largest target count for all
  layers at once, one host copy per step).

All three must give identical assignments (checked). The share of the training step is measured inside real
training steps of the demo config (the matcher timed while the step runs) and, for R50, against the step times
of a ``bench_train.py --json`` file.

    python benchmarks/bench_matcher.py --train_json /tmp/r50_512.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from speed_common import format_info, machine_info, markdown_table

from models.matcher import HungarianMatcher
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# name: (batch, queries, logits (K + 1), decoder layers, mean targets per image)
CASES = {
    "r50 (B2 Q100 L6 T~7)": (2, 100, 92, 6, 7),
    "crowded (B8 Q100 L6 T~20)": (8, 100, 92, 6, 20),
    "demo (B8 Q20 L2 T~4)": (8, 20, 92, 2, 4),
}


def make_case(batch: int, queries: int, logits: int, layers: int, targets: int, device: str, seed: int = 0):
    """Random decoder outputs for ``layers`` layers and targets with Poisson(targets) boxes per image."""
    generator = torch.Generator().manual_seed(seed)
    outputs = [
        {
            "pred_logits": torch.randn(batch, queries, logits, generator=generator).to(device),
            "pred_boxes": (0.1 + 0.8 * torch.rand(batch, queries, 4, generator=generator)).to(device),
        }
        for _ in range(layers)
    ]
    counts = torch.poisson(torch.full((batch,), float(targets)), generator=generator).clamp(0, queries).long()
    target_list = []
    for n in counts.tolist():
        centers = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        extents = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
        labels = torch.randint(1, logits - 1, (n,), generator=generator)
        target_list.append({"labels": labels.to(device), "boxes": torch.cat([centers, extents], 1).to(device)})
    return outputs, target_list


def match_flat_per_layer(matcher: HungarianMatcher, outputs: dict, targets: list[dict]):
    """Baseline: one [B*Q, sum T] cost per layer, one host copy per layer, split into per-image blocks."""
    from scipy.optimize import linear_sum_assignment

    batch, queries = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
    boxes = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    cost = (
        matcher.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        - matcher.cost_class * prob[:, tgt_ids]
        - matcher.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    )
    cost = cost.view(batch, queries, -1).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    indices = []
    for b, block in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(block[b].numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


def _median_time(fn, args: tuple, repeats: int, sync) -> tuple[float, object]:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls (CPU time of the process on CPU, else wall)."""
    clock = time.perf_counter if sync is not None else time.process_time
    result, times = None, []
    for _ in range(repeats + 1):  # the first call warms caches and is dropped
        tic = clock()
        result = fn(*args)
        if sync is not None:
            sync()
        times.append(clock() - tic)
    return statistics.median(times[1:]), result


def _per_image(matcher: HungarianMatcher, outputs: list[dict], targets: list[dict]):
    return [matcher.match_per_image(o, targets) for o in outputs]


def _flat(matcher: HungarianMatcher, outputs: list[dict], targets: list[dict]):
    return [match_flat_per_layer(matcher, o, targets) for o in outputs]


def _batched(matcher: HungarianMatcher, outputs: list[dict], targets: list[dict]):
    return matcher.match_layers(outputs, targets)


def _same(a, b) -> bool:
    return all(
        torch.equal(ra, rb) and torch.equal(ca, cb)
        for layer_a, layer_b in zip(a, b)
        for (ra, ca), (rb, cb) in zip(layer_a, layer_b)
    )


def micro_benchmark(device: str, repeats: int) -> list[list[str]]:
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    rows = []
    for name, case in CASES.items():
        outputs, targets = make_case(*case, device=device)
        args = (matcher, outputs, targets)
        t_plain, plain = _median_time(_per_image, args, repeats, sync)
        t_flat, flat = _median_time(_flat, args, repeats, sync)
        t_batched, batched = _median_time(_batched, args, repeats, sync)
        if not (_same(plain, batched) and _same(flat, batched)):
            raise SystemExit(f"error: {name}: the matchers disagree")
        rows.append(
            [
                name,
                f"{t_plain * 1e3:.2f}",
                f"{t_flat * 1e3:.2f}",
                f"{t_batched * 1e3:.2f}",
                f"{t_plain / t_batched:.2f}",
            ]
        )
    return rows


def share_in_demo_steps(steps: int, threads: int, device: str = "cpu") -> list[list[str]]:
    """Time the matcher inside real demo-config training steps (float32 sdpa) on ``device``."""
    import bench_train

    if threads > 0:
        torch.set_num_threads(threads)
    spent: list[float] = []
    original = HungarianMatcher.match_layers

    # The same clock as run_variant's step time: process CPU time on CPU, wall time on CUDA (where the matcher's
    # copy of the cost matrices to the host synchronises).
    clock = time.process_time if device == "cpu" else time.perf_counter

    def timed(self, *args, **kwargs):
        tic = clock()
        out = original(self, *args, **kwargs)
        spent.append(clock() - tic)
        return out

    HungarianMatcher.match_layers = timed
    try:
        result = bench_train.run_variant("demo", "sdpa", steps, 1, 0, device)
    finally:
        HungarianMatcher.match_layers = original
    matcher_s = statistics.median(spent[-steps:])
    return [
        [
            "demo (measured in step)",
            "sdpa",
            f"{matcher_s * 1e3:.2f}",
            f"{result['step_s']:.3f}",
            f"{100 * matcher_s / result['step_s']:.2f}%",
        ]
    ]


def share_from_json(path: Path, device: str, repeats: int) -> list[list[str]]:
    """Batched matcher time of the R50 case over each variant's step time in a bench_train JSON file."""
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    outputs, targets = make_case(*CASES["r50 (B2 Q100 L6 T~7)"], device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t_batched, _ = _median_time(_batched, (matcher, outputs, targets), repeats, sync)
    rows = []
    for r in json.loads(path.read_text()):
        if "step_s" in r and r["config"].startswith("r50"):
            share = 100 * t_batched / r["step_s"]
            rows.append([r["config"], r["variant"], f"{t_batched * 1e3:.2f}", f"{r['step_s']:.3f}", f"{share:.3f}%"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", default=20, type=int)
    parser.add_argument("--demo_steps", default=3, type=int, help="demo training steps for the in-step share (0: skip)")
    parser.add_argument("--threads", default=0, type=int, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--train_json", default=None, help="bench_train.py --json output for the R50 share")
    opts = parser.parse_args(argv)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    print(format_info(machine_info()), flush=True)
    header = ["case", "per_image ms", "flat_per_layer ms", "batched ms", "per_image / batched"]
    print(markdown_table(header, micro_benchmark(opts.device, opts.repeats)), flush=True)
    share_rows = []
    if opts.demo_steps > 0:
        share_rows += share_in_demo_steps(opts.demo_steps, opts.threads, opts.device)
    if opts.train_json:
        share_rows += share_from_json(Path(opts.train_json), opts.device, opts.repeats)
    if share_rows:
        print(markdown_table(["config", "variant", "matcher ms", "step s", "matcher share"], share_rows))


if __name__ == "__main__":
    main()
