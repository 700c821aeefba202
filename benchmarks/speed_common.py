"""Shared pieces of the speed benchmarks: repository import path, machine description, markdown tables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pycocotools", "faster-coco-eval")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """CPU/GPU, core count, load and library versions, for the header of a results table."""
    import torch

    info = {
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
    }
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    if hasattr(os, "getloadavg"):
        info["load average at start (1, 5, 15 min)"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return info


def format_info(info: dict[str, str]) -> str:
    """Machine info as markdown bullet lines."""
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rss_kib(field: str) -> int:
    """This process's memory figure ``field`` of /proc/self/status ('VmRSS', 'VmHWM' = peak) in KiB, 0 if absent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the peak resident set (VmHWM) to the current one; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False
