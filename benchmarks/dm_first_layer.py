"""One DM iteration on the CPU (bf16 + compile, the quick settings) with one lever changed: the chunk
size of the real images' pass, or the form of ConvNet's first convolution (3 input channels).

    python benchmarks/dm_first_layer.py --chunk 64
    python benchmarks/dm_first_layer.py --first-conv pad8

Run each setting in its own fresh process and alternate them (this machine's speed drifts by up to
~30% over minutes; benchmarks/RESULTS.md). Prints milliseconds per iteration for 4 blocks of
`--iterations / 4` iterations, after 8 warm-up iterations (compilation). The iteration is
`benchmarks/profile_cpu.py`'s DM path on random data. First-convolution forms: `native` (F.conv2d, what
biasdd runs on the real images), `padN` (input and weight zero-padded to N input channels: the same
maths), `fp32` (the first convolution outside autocast). Every form here drops `PatchGradConv2d`'s own
weight gradient, which DM never uses (its network is frozen).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import biasdd.compute as compute
import biasdd.nets as nets

sys.path.insert(0, str(Path(__file__).parent))
import profile_cpu  # noqa: E402 (benchmarks/ is not a package)

FORMS = ("native", "pad4", "pad8", "pad16", "fp32")


def first_conv(form: str):  # noqa: ANN201
    def forward(self: nets.PatchGradConv2d, x: Tensor) -> Tensor:
        w, b, p = self.weight, self.bias, self.padding[0]
        if form.startswith("pad"):
            extra = int(form[3:]) - x.shape[1]
            return F.conv2d(F.pad(x, (0, 0, 0, 0, 0, extra)), F.pad(w, (0, 0, 0, 0, 0, extra)), b, padding=p)
        if form == "fp32":
            with torch.autocast("cpu", enabled=False):
                return F.conv2d(x.float(), w.float(), b.float(), padding=p)
        return F.conv2d(x, w, b, padding=p)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=compute.CPU_CHUNK, help="images per real-side pass")
    parser.add_argument("--first-conv", default="native", choices=FORMS)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    compute.CPU_CHUNK = args.chunk
    nets.PatchGradConv2d.forward = first_conv(args.first_conv)
    iteration = profile_cpu.paths(compute.ComputeConfig("bf16", True))["dm"]
    for _ in range(8):
        iteration()
    block = max(1, args.iterations // 4)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(block):
            iteration()
        times.append(1e3 * (time.perf_counter() - start) / block)
    print(f"chunk {args.chunk}, first conv {args.first_conv}: " + " ".join(f"{t:.1f}" for t in times) + " ms")


if __name__ == "__main__":
    main()
