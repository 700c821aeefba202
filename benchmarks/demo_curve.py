"""AP-vs-wall-time curve of the demo (``configs/demo.yaml``) as a markdown table.

Usage:
    python benchmarks/demo_curve.py --run [--output_dir runs/demo_curve] [extra main.py flags]
        runs the demo end to end (data generation included) and prints the table;
    python benchmarks/demo_curve.py --log path/to/log.txt
        prints the table of an existing run.

The run's wall time depends on what else the machine does; the table also gives the CPU time used, the
load average and the core count so that numbers taken on a shared machine can be judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_table(lines: list[dict]) -> str:
    """Markdown rows: epoch, elapsed wall time, COCO AP / AP50 / AP75 / AR100, train loss."""
    rows = [
        "| epoch | elapsed (s) | AP | AP50 | AP75 | AR@100 | train loss |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for line in lines:
        stats = line.get("test_coco_eval_bbox")
        ap = [f"{stats[i]:.3f}" for i in (0, 1, 2, 8)] if stats else ["-"] * 4
        rows.append(
            f"| {line['epoch']} | {line.get('elapsed_time', float('nan')):.0f} | {' | '.join(ap)} "
            f"| {line['train_loss']:.3f} |"
        )
    return "\n".join(rows)


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load[0]:.1f}"
    )


def run_demo(output_dir: Path, extra: list[str]) -> tuple[float, float, float]:
    """Run the demo; returns (wall seconds, CPU seconds of the run, load average at the end)."""
    cmd = [sys.executable, "main.py", "--config", "configs/demo.yaml", "--output_dir", str(output_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, usage.ru_utime + usage.ru_stime, os.getloadavg()[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="log.txt of a finished run")
    parser.add_argument("--run", action="store_true", help="run the demo first")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/demo_curve"))
    args, extra = parser.parse_known_args(argv)  # unknown flags go to main.py
    if args.run:
        before = machine()
        wall, cpu, load = run_demo(args.output_dir, extra)
        lines = read_log(args.output_dir / "log.txt")
        print(f"\nmachine: {before}")
        print(
            f"wall time {wall:.0f} s (data generation included), CPU time {cpu:.0f} s, load average at end {load:.1f}"
        )
    elif args.log is not None:
        lines = read_log(args.log)
    else:
        parser.error("give a log.txt or --run")
    print(curve_table(lines))


if __name__ == "__main__":
    main()
