"""Where the time goes on the CPU: a torch.profiler table of each hot path at the quick settings.

    python benchmarks/profile_cpu.py [--paths dm,dc_match,dc_inner,dsa_augment,eval,full,bias_model]
                                     [--precision bf16] [--compile]

Paths (ConvNet-3 width 32, IPC 10, batch_real 64, CMNIST-DD shape 3x28x28 on random data):
dm (one DM iteration), dc_match (one DC matching step, 10 classes), dc_inner (one inner-loop training
step on the synthetic set), dsa_augment (one siamese DSA call over 740 images), eval (one epoch of one
evaluation network on 100 synthetic images with DSA), full (one full-set training step, batch 256),
bias_model (one GCE step of the bias model, width 16, batch 128). Each path runs a few warm-up calls
(compilation) first; the table lists the ops by self CPU time, and the line above it the milliseconds
per call. Cost: about a minute with --compile, less without.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from biasdd.distill import dc, dm
from biasdd.pipeline import bias_model
from biasdd.training.augment import DSAConfig, dsa_augment
from biasdd.training.compute import ComputeConfig, NetworkRunner
from biasdd.training.nets import build_network

K, IPC, BATCH_REAL, WIDTH, SIZE = 10, 10, 64, 32, 28
DSA = DSAConfig("color_crop_cutout_scale_rotate", 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)


def paths(setting: ComputeConfig) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    net = build_network("convnet3", 3, K, SIZE, WIDTH, generator=g)
    runner = NetworkRunner(net, setting, "cpu")
    real = torch.randn(K, BATCH_REAL, 3, SIZE, SIZE, generator=g)
    syn = torch.randn(K, IPC, 3, SIZE, SIZE, generator=g).requires_grad_(True)
    labels = torch.arange(K).repeat_interleave(IPC)
    groups = torch.cat([torch.arange(K).repeat_interleave(BATCH_REAL), labels])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)

    def dm_iteration() -> None:
        net.requires_grad_(False)
        both = dsa_augment(torch.cat([real.flatten(0, 1), syn.flatten(0, 1)]), DSA, g, groups, K * BATCH_REAL)
        r, s = both[: K * BATCH_REAL], both[K * BATCH_REAL :]
        loss = dm.embedding_loss(net, r.view_as(real), s.view_as(syn), runner)
        torch.autograd.grad(loss, [syn])

    def dc_match() -> None:
        net.requires_grad_(True)
        loss = dc.matching_loss(net, real, syn, dc.ClassGradients(False), runner)
        torch.autograd.grad(loss, [syn])

    def dc_inner() -> None:
        net.requires_grad_(True)
        dc.train_network(runner, optimizer, syn.detach().flatten(0, 1), labels, 1, 256, g, DSA)

    def augment() -> None:
        dsa_augment(torch.cat([real.flatten(0, 1), syn.flatten(0, 1)]), DSA, g, groups, K * BATCH_REAL)

    full_x = torch.randn(256, 3, SIZE, SIZE, generator=g)
    full_y = torch.randint(0, K, (256,), generator=g)
    full_opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def full_step() -> None:
        net.requires_grad_(True)
        loss = F.cross_entropy(runner.forward(full_x), full_y)
        full_opt.zero_grad(set_to_none=True)
        loss.backward()
        full_opt.step()

    small = build_network("convnet3", 3, K, SIZE, 16, generator=g)
    small_runner = NetworkRunner(small, setting, "cpu")
    adam = torch.optim.Adam(small.parameters(), lr=1e-3)

    def bias_model_step() -> None:
        loss = bias_model.gce_loss(small_runner.forward(full_x[:128]), full_y[:128], 0.7)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    return {
        "dm": dm_iteration,
        "dc_match": dc_match,
        "dc_inner": dc_inner,
        "dsa_augment": augment,
        "eval": dc_inner,  # one epoch of an evaluation network on 100 images = one step of this shape
        "full": full_step,
        "bias_model": bias_model_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="dm,dc_match,dc_inner,dsa_augment,full,bias_model")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    setting = ComputeConfig(args.precision, args.compile)
    table = paths(setting)
    for name in args.paths.split(","):
        fn = table[name]
        for _ in range(6):  # warm-up: hot shapes compile after a few calls
            fn()
        start = time.perf_counter()
        for _ in range(args.calls):
            fn()
        per_call = (time.perf_counter() - start) / args.calls
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                fn()
        print(f"\n## {name}: {1e3 * per_call:.1f} ms per call ({args.precision}, compile {args.compile})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
