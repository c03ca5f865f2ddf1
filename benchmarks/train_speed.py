"""Evaluation and full-set training on the CPU: today's code against an earlier version, side by side.

    git worktree add /tmp/biasdd-before 1b48a85                # the code to compare with
    python benchmarks/train_speed.py --before /tmp/biasdd-before/src [--rounds 3]

Two measurements at the quick settings (ConvNet-3 width 32, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 256):
(a) evaluation training: 3 networks on a synthetic set of 100 images (IPC 10) with per-sample DSA for
    `--eval-epochs` epochs, per epoch of the 3 networks: "first" = the first such call in a fresh
    process (compilation included, amortised over the epochs, as a stage run pays it), "steady" = the
    same call again in that process (compiled code reused);
(b) full-set training: one network, one epoch over `--full-n` CMNIST-DD-shaped images (3x28x28).
Each measurement runs in a fresh process (`--worker`) with either source tree on PYTHONPATH; the
rounds alternate before/now so that both see the same machine state. This code runs with the quick
budget's compute settings (bf16, torch.compile on the CPU) and, as a second row, fp32 eager; the
earlier code has no such settings. Figures are medians over rounds.
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

NOW = Path(__file__).resolve().parents[1] / "src"


def worker(args: argparse.Namespace) -> None:
    import torch

    from biasdd.training.augment import DSAConfig, dsa_augment
    from biasdd.training.nets import build_network

    try:  # this version
        from biasdd.training.compute import ComputeConfig
        from biasdd.training.trainer import TrainConfig, train_networks

        extra = {"compute": ComputeConfig(args.precision, bool(args.compile))}
    except (
        ImportError
    ):  # the earlier version: training lived in biasdd.pipeline.evaluate, no compute settings
        from biasdd.pipeline.evaluate import TrainConfig, train_networks

        extra = {}
    dsa = DSAConfig("color_crop_cutout_scale_rotate", 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)
    g = torch.Generator().manual_seed(0)

    def factory(generator: torch.Generator) -> torch.nn.Module:
        return build_network("convnet3", 3, 10, 28, 32, generator=generator)

    def timed(images, labels, nets: int, epochs: int, augment) -> float:
        cfg = TrainConfig(
            epochs=epochs,
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=256,
            lr_milestones=(),
            lr_gamma=0.1,
        )
        generators = [torch.Generator().manual_seed(s) for s in range(nets)]
        start = time.perf_counter()
        train_networks(images, labels, factory, cfg, generators, augment=augment, progress=False, **extra)
        return time.perf_counter() - start

    if args.work == "eval":
        images = torch.randn(100, 3, 28, 28, generator=g)
        labels = torch.arange(10).repeat_interleave(10)
        augment = lambda x, gen: dsa_augment(x, dsa, gen)  # noqa: E731
        first = timed(images, labels, 3, args.eval_epochs, augment) / args.eval_epochs
        steady = timed(images, labels, 3, args.eval_epochs, augment) / args.eval_epochs
        print(json.dumps({"first": first, "steady": steady}))
        return
    else:
        images = torch.randn(args.full_n, 3, 28, 28, generator=g)
        labels = torch.randint(0, 10, (args.full_n,), generator=g)
        timed(images[:2048], labels[:2048], 1, 1, None)  # warm-up: compilation of the batch shape
        seconds = timed(images, labels, 1, 1, None)
    print(json.dumps({"first": seconds}))


def measure(src: Path, work: str, args: argparse.Namespace, precision: str, compile_: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [
        sys.executable, __file__, "--worker", work, "--precision", precision, "--compile", str(compile_),
        "--eval-epochs", str(args.eval_epochs), "--full-n", str(args.full_n),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="src/ of the version to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-epochs", type=int, default=100)
    parser.add_argument("--full-n", type=int, default=60_000)
    parser.add_argument("--work", default="eval,full")
    parser.add_argument("--worker", choices=["eval", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.work = args.worker
        worker(args)
        return
    if args.before is None:
        parser.error("--before is required (the src/ folder of the version to compare with)")
    rows = {
        "before": ("fp32", 0, args.before),
        "now bf16+compile": ("bf16", 1, NOW),
        "now fp32 eager": ("fp32", 0, NOW),
    }
    for work in args.work.split(","):
        times: dict[str, list[dict]] = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, (precision, compile_, src) in rows.items():
                times[name].append(measure(src, work, args, precision, compile_))
        kinds = ["first", "steady"] if work == "eval" else ["first"]
        for kind in kinds:
            before = statistics.median(t[kind] for t in times["before"])
            what = (
                f"(a) evaluation, {kind}: 3 networks, per epoch on 100 images with DSA, over "
                f"{args.eval_epochs} epochs"
                if work == "eval"
                else f"(b) full set: one network, one epoch on {args.full_n} images"
            )
            for name in rows:
                median = statistics.median(t[kind] for t in times[name])
                print(f"| {what} | {name} | {median:.3f} s | {before / median:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
