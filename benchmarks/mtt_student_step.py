"""MTT's student step alone, with nn.ReLU against MaskReLU: seconds for `syn_steps` compiled steps
theta -> theta - lr * grad CE(theta) on the synthetic set (forward) and for the backward through them to
the images and the step size, with `biasdd.distill.mtt.student_step` (quick settings: ConvNet-3 width 32,
100 images of 3x32x32, 10 steps, bf16 autocast, torch.compile with inductor's channels-last layout).

    python benchmarks/mtt_student_step.py            # ~1 min on a 2-core CPU

Why MaskReLU (docs/protocol.md §6): inductor stores ReLU's mask as a bool tensor, which its CPU code
handles one byte at a time. Prints one row per ReLU: the median over `--rounds` after one warm-up round.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from biasdd.distill.mtt import student_step
from biasdd.pipeline.experts import flat_parameters
from biasdd.training.compute import ComputeConfig, tune_cpu_allocator
from biasdd.training.nets import build_network


def times(net: torch.nn.Module, mask_relu: bool, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds of the forward (all steps) and of the backward, over `args.rounds` rounds."""
    compute = ComputeConfig(precision=args.precision, compile=True)
    compiled = student_step(net, compute, "cpu", mask_relu=mask_relu)
    generator = torch.Generator().manual_seed(0)
    theta0 = flat_parameters(net)
    images = torch.randn(10 * args.ipc, 3, 32, 32, generator=generator).requires_grad_(True)
    labels = torch.arange(10).repeat_interleave(args.ipc)
    lr = torch.tensor(0.01, requires_grad=True)
    forward, backward = [], []
    for _ in range(args.rounds + 1):  # the first round compiles
        start = time.perf_counter()
        theta = theta0.clone().requires_grad_(True)
        for _ in range(args.syn_steps):
            theta = compiled(theta, images, labels, lr)
        middle = time.perf_counter()
        ((theta - theta0) ** 2).sum().backward()
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    return statistics.median(forward[1:]), statistics.median(backward[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--syn-steps", type=int, default=10)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tune_cpu_allocator()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| ReLU | forward, s | backward, s | total, s |\n|---|---|---|---|")
    for name in ("nn.ReLU", "MaskReLU"):
        net = build_network("convnet3", 3, 10, 32, args.width, generator=torch.Generator().manual_seed(0))
        forward, backward = times(net, name == "MaskReLU", args)
        print(f"| {name} | {forward:.3f} | {backward:.3f} | {forward + backward:.3f} |", flush=True)


if __name__ == "__main__":
    main()
