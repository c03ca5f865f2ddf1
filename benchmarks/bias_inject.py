"""Bias-injection throughput: images per second for a full CMNIST-DD and CCIFAR10-DD training set.

    python benchmarks/bias_inject.py [--n-cifar 50000] [--workers N] [--append benchmarks/RESULTS.md]

CMNIST-DD uses the real MNIST training set (embedded copy); CCIFAR10-DD uses random CIFAR-shaped pixels
(32x32x3 uint8: corruption cost hardly depends on content). Targets: full CMNIST-DD
training set <= 30 s, full CCIFAR10-DD training set (50,000 images) <= 3 min. Cost: about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

from biasdd.config import from_dict
from biasdd.params import load_params
from biasdd.pipeline.bias_inject import BiasConfig, CMNISTConfig, assign_attributes, default_workers, inject
from biasdd.pipeline.download import load_base

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cifar", type=int, default=50000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--severity", type=int, default=4)
    parser.add_argument("--append", type=Path, default=None, help="append result rows to this markdown file")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    cmnist = from_dict(CMNISTConfig, params["cmnist"], "cmnist")
    rows = []
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} workers"

    base = load_base("cmnist", None, ROOT / "data/embedded", ROOT / ".cache/datasets", allow_download=False)
    cfg = BiasConfig("cmnist", 0.95, args.severity, 0, "cifar10c")
    attributes = assign_attributes(base.train_labels, 0.95)
    start = time.perf_counter()
    inject(base.train_images, attributes, cfg, "train", cmnist, workers=args.workers)
    seconds = time.perf_counter() - start
    rows.append(("CMNIST-DD train (real MNIST)", len(attributes), seconds, "<= 30 s"))

    for protocol in ("cifar10c", "imagenet-c"):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.n_cifar, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(args.n_cifar) % 10
        cfg = BiasConfig("ccifar10", 0.95, args.severity, 0, protocol)
        attributes = assign_attributes(labels, 0.95)
        start = time.perf_counter()
        inject(images, attributes, cfg, "train", workers=args.workers)
        seconds = time.perf_counter() - start
        target = "<= 180 s" if protocol == "cifar10c" else "(no target)"
        rows.append(
            (f"CCIFAR10-DD train, {protocol} (random CIFAR-shaped pixels)", args.n_cifar, seconds, target)
        )

    today = datetime.date.today().isoformat()
    lines = []
    for what, n, seconds, target in rows:
        lines.append(
            f"| {today} | {machine} | `python benchmarks/bias_inject.py` | "
            f"{what}, severity {args.severity} | "
            f"{n} images in {seconds:.1f} s = {n / seconds:,.0f} img/s | {target} |"
        )
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
