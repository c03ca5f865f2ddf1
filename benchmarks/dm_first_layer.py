"""One DM iteration on the CPU (bf16 + compile, the quick settings) with one lever changed: the chunk
size of the real images' pass, or the form of ConvNet's first convolution (3 input channels).

    python benchmarks/dm_first_layer.py --chunk 64
    python benchmarks/dm_first_layer.py --first-conv pad8

Run each setting in its own fresh process and alternate them (this machine's speed drifts by up to
~30% over minutes; benchmarks/RESULTS.md). Prints milliseconds per iteration for 4 blocks of
`--iterations / 4` iterations, after 8 warm-up iterations (compilation). The iteration is
`benchmarks/profile_cpu.py`'s DM path on random data. First-convolution forms: `native` (F.conv2d, what
biasdd runs on the real images), `padN` (input and weight zero-padded to N input channels: the same
maths), `fp32` (the first convolution outside autocast), `s2d` (space-to-depth: the padded input's 2x2
pixel blocks as 12 channels, one 2x2 convolution with 4x the output channels, one per output pixel
phase, then `pixel_shuffle` back: the same maths with 48 instead of 27 multiplies per output and a
4x wider GEMM). Every form here drops `PatchGradConv2d`'s own weight gradient, which DM never uses (its
network is frozen). `free` and `free_cl` are NOT the same maths but a bound: the padded input's 3
channels repeated to the layer's width plus the bias, an output of the right shape for the cost of
writing it (`free_cl` in channels-last layout, as the compiled graphs run the native convolution), so
their time is what a DM iteration would take if the first convolution's arithmetic were free (forward
and input gradient).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import biasdd.training.compute as compute
import biasdd.training.nets as nets

sys.path.insert(0, str(Path(__file__).parent))
import profile_cpu  # noqa: E402 (benchmarks/ is not a package)

FORMS = ("native", "pad4", "pad8", "pad16", "fp32", "s2d", "free", "free_cl")


def space_to_depth_weight(w: Tensor) -> Tensor:
    """(out, in, 3, 3) -> (4 * out, 4 * in, 2, 2) for a 3x3 convolution on 2x2 pixel blocks: output
    channel (o, pi, pj) is output pixel phase (pi, pj); input channel (c, si, sj) is `pixel_unshuffle`'s."""
    out_channels, in_channels = w.shape[:2]
    blocks = w.new_zeros(out_channels, 2, 2, in_channels, 2, 2, 2, 2)  # o, pi, pj, c, bi, bj, si, sj
    for pi in range(2):
        for pj in range(2):
            for di in range(3):
                for dj in range(3):
                    r, s = pi + di, pj + dj
                    blocks[:, pi, pj, :, r // 2, s // 2, r % 2, s % 2] = w[:, :, di, dj]
    return blocks.permute(0, 1, 2, 3, 6, 7, 4, 5).reshape(4 * out_channels, 4 * in_channels, 2, 2)


def space_to_depth_conv(x: Tensor, w: Tensor, b: Tensor, padding: int) -> Tensor:
    """F.conv2d(x, w, b, padding=padding) for a 3x3 kernel whose padded input has even sides."""
    padded = F.pad(x, (padding,) * 4)
    if padded.shape[-1] % 2 or padded.shape[-2] % 2:
        raise ValueError(f"s2d needs even padded sides, got {tuple(padded.shape[-2:])}")
    y = F.conv2d(F.pixel_unshuffle(padded, 2), space_to_depth_weight(w))
    return F.pixel_shuffle(y, 2) + b.view(1, -1, 1, 1)


def first_conv(form: str):  # noqa: ANN201
    def forward(self: nets.PatchGradConv2d, x: Tensor) -> Tensor:
        w, b, p = self.weight, self.bias, self.padding[0]
        if form.startswith("pad"):
            extra = int(form[3:]) - x.shape[1]
            return F.conv2d(F.pad(x, (0, 0, 0, 0, 0, extra)), F.pad(w, (0, 0, 0, 0, 0, extra)), b, padding=p)
        if form == "s2d":
            return space_to_depth_conv(x, w, b, p)
        if form.startswith("free"):  # a bound, not a convolution: the output's shape for writing it
            low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            padded = F.pad(x.to(low), (p - 1,) * 4)  # a 3x3 kernel's output side: side + 2p - 2
            repeats = -(-w.shape[0] // x.shape[1])
            out = padded.repeat(1, repeats, 1, 1)[:, : w.shape[0]] + b.to(low).view(1, -1, 1, 1)
            return out.contiguous(memory_format=torch.channels_last) if form == "free_cl" else out
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
    conv, x = nets.PatchGradConv2d(3, 32, 3, 3), torch.randn(4, 3, 28, 28)  # same maths as the native form?
    with torch.no_grad():
        error = (
            (first_conv(args.first_conv)(conv, x) - F.conv2d(x, conv.weight, conv.bias, padding=3))
            .abs()
            .max()
        )
    if error > 1e-4 and not args.first_conv.startswith("free"):
        raise SystemExit(f"first conv {args.first_conv}: differs from F.conv2d by {error:.2e}")
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
