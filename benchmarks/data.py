"""Data-loading throughput per worker: images/s of the train and eval pipelines, PIL vs torchvision.io decoding.

Generates 640x480 JPEGs (the typical COCO size) with a COCO annotation file in a temporary folder, then times
``CocoDetection`` with the published transforms in one process with one thread (what one DataLoader worker
does). Writes a markdown table.

    python benchmarks/data.py --out /tmp/data_table.md  (then paste into benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import torch
import torchvision
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import CocoDetection, make_coco_transforms  # noqa: E402
from datasets.coco_io import read_image_rgb  # noqa: E402
from datasets.transforms import Compose  # noqa: E402


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 640x480 JPEGs (smooth gradients, shapes, noise; quality 90) and their annotation file."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    images, annotations = [], []
    for index in range(count):
        base = rng.uniform(0, 255, 3) * 0.5 + np.stack([x / 640, y / 480, (x + y) / 1120], -1) * 120
        pixels = base + rng.normal(0, 12, (480, 640, 3))
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            w, h = int(rng.integers(20, 640 - x0)), int(rng.integers(20, 480 - y0))
            pixels[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "category_id": 1, "bbox": [x0, y0, w, h]}
            )
        name = f"{index:06d}.jpg"
        PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / "images" / name, quality=90)
        images.append({"id": index + 1, "file_name": name, "width": 640, "height": 480})
    ann_file = folder / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    return ann_file


def _pil_to_tensor_first(transforms):
    return Compose([lambda image, target: (F.pil_to_tensor(image), target), transforms])


def best_rate(passes: dict[str, callable], rounds: int) -> dict[str, float]:
    """Images/s of each pass (a callable returning its image count), best of ``rounds`` interleaved runs.

    Interleaving and keeping the best run makes the comparison fair on a machine shared with other jobs.
    """
    best = dict.fromkeys(passes, 0.0)
    for _ in range(rounds):
        for name, run in passes.items():
            torch.manual_seed(0)  # the same augmentation draws for every variant
            start = time.perf_counter()
            count = run()
            best[name] = max(best[name], count / (time.perf_counter() - start))
    return best


def dataset_pass(dataset) -> callable:
    def run() -> int:
        for index in range(len(dataset)):
            dataset[index]
        return len(dataset)

    return run


def decode_pass(folder: Path, decoder: str) -> callable:
    paths = sorted((folder / "images").iterdir())

    def run() -> int:
        for path in paths:
            read_image_rgb(path, decoder)
        return len(paths)

    return run


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved runs per measurement (best kept)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker

    variants = {
        "PIL decode, PIL transforms (published path)": ("pil", lambda t: t),
        "PIL decode, tensor transforms": ("pil", _pil_to_tensor_first),
        "torchvision.io decode, tensor transforms (default)": ("torchvision", lambda t: t),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ann_file = write_images(folder, args.num_images)
        passes = {}
        for name, (decoder, wrap) in variants.items():
            passes[(name, "decode")] = decode_pass(folder, decoder)
            for image_set in ("train", "val"):
                transforms = wrap(make_coco_transforms(image_set))
                dataset = CocoDetection(folder / "images", ann_file, transforms, False, decoder=decoder)
                dataset_pass(dataset)()  # warm-up
                passes[(name, image_set)] = dataset_pass(dataset)
        rates = best_rate(passes, args.rounds)
    rows = [(name, *(rates[(name, kind)] for kind in ("decode", "train", "val"))) for name in variants]

    command = "python benchmarks/data.py " + " ".join(sys.argv[1:])
    lines = [
        "## Data loading throughput per worker (images/s, 640x480 JPEG, 1 thread)",
        "",
        "| variant | decode only | train pipeline | eval pipeline |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {d:.0f} | {t:.1f} | {e:.1f} |" for name, d, t, e in rows],
        "",
        f"Machine: {platform.machine()} {_cpu_name()} with {os.cpu_count()} CPUs (shared with other "
        f"jobs; load average {os.getloadavg()[0]:.1f}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}.",
        f"Command: `{command.strip()}` ({args.num_images} images, best of {args.rounds} interleaved runs; "
        "train = published multi-scale augmentation, eval = short side 800, long side <= 1333; both end with the "
        "float normalisation).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
