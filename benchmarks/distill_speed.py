"""Seconds per outer iteration and peak GPU memory of DC, DSA, DM and MTT on random data.

Paper settings by default (docs/protocol.md §6): IPC 50, ConvNet-3 width 128, 10 classes, batch_real
256, outer_loop 50 / inner_loop 10, DSA strategy without flip for the MNIST shape; MTT: 30 student
steps on all K * IPC synthetic images (`--batch-syn`), 2 expert epochs, start epochs up to 40, matched to
stand-in expert trajectories (random steps from an init: the cost does not depend on their values).
Shapes: `mnist` = 3x28x28 (CMNIST-DD, padded to 32 inside the net), `cifar` = 3x32x32.

    python benchmarks/distill_speed.py --device cuda --iterations 3            # GPU, paper settings
    python benchmarks/distill_speed.py --device cuda --precision bf16          # GPU, bf16 autocast
    python benchmarks/distill_speed.py --device cpu --width 16 --ipc 10 --outer-loop 5 --inner-loop 2 \\
        --iterations 2 --methods dc,dsa,dm                                       # reduced CPU run
    python benchmarks/distill_speed.py --device cuda --methods mtt --shapes cifar  # MTT, paper settings

Cost: on one H100/H200, DM ~20-30 ms and DC/DSA several seconds per outer iteration are expected (the
reference measured 0.1 s and 14-26 s, PERFORMANCE.md), so the GPU command above takes ~2-4 minutes
including warm-up. A full-width DC outer iteration on CPU takes many minutes: use the reduced flags,
which the output labels ("reduced").

Timing: one `distill` run per case with a checkpoint callback that records the time (its CPU copies
synchronise the device) every outer iteration (DM: every 50); the first `warmup` intervals (set-up,
first-call costs) are dropped and the median of the rest is reported. One markdown row per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from biasdd.distill import METHODS, mtt
from biasdd.training.augment import DSAConfig
from biasdd.training.compute import ComputeConfig
from biasdd.training.nets import build_network

NUM_CLASSES = 10
SHAPES = {"mnist": (3, 28), "cifar": (3, 32)}
PAPER = {"width": 128, "ipc": 50, "outer_loop": 50, "inner_loop": 10, "batch_real": 256}
MTT_PAPER = {
    "syn_steps": 30,
    "expert_epochs": 2,
    "max_start_epoch": 40,
    "batch_syn": None,
}  # CIFAR-10, IPC 50


def dsa_config(shape: str) -> DSAConfig:
    # docs/protocol.md §6: the full strategy, without flip for digits.
    ops = "color_crop_cutout_scale_rotate" if shape == "mnist" else "color_crop_cutout_flip_scale_rotate"
    return DSAConfig(ops, 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)


def method_config(method: str, args: argparse.Namespace, iterations: int):
    if method == "mtt":
        return METHODS["mtt"].config(
            ipc=args.ipc, iterations=iterations, lr_img=1000.0, momentum_img=0.5, batch_real=args.batch_real,
            init="real", syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
            max_start_epoch=args.max_start_epoch, lr_lr=1e-5, lr_teacher=0.01, batch_syn=args.batch_syn,
        )  # fmt: skip
    if method == "dm":
        values = dict(
            ipc=args.ipc, iterations=iterations, lr_img=1.0, momentum_img=0.5, batch_real=args.batch_real
        )
        values["init"] = "real"
    else:
        values = dict(
            ipc=args.ipc,
            iterations=iterations,
            outer_loop=args.outer_loop,
            inner_loop=args.inner_loop,
            lr_img=0.1,
            momentum_img=0.5,
            lr_net=0.01,
            batch_real=args.batch_real,
            batch_train=256,
            init="noise" if method == "dc" else "real",
        )
    return METHODS[method].config(**values)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def time_case(method: str, shape: str, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    channels, size = SHAPES[shape]
    data_gen = torch.Generator().manual_seed(0)
    per_class = max(args.batch_real, args.ipc) + 8
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    images = torch.randn(len(labels), channels, size, size, generator=data_gen)
    images, labels = images.to(device), labels.to(device)

    def net_factory(generator: torch.Generator) -> torch.nn.Module:
        net = build_network("convnet3", channels, NUM_CLASSES, size, width=args.width, generator=generator)
        return net.to(device)

    extra = {}
    if method == "mtt":  # stand-in experts: 2 trajectories of random steps from an init
        net = net_factory(torch.Generator().manual_seed(2)).cpu()
        start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        epochs = args.max_start_epoch + args.expert_epochs
        steps = 0.01 * torch.randn(2, epochs, start.numel(), generator=data_gen)
        params = torch.cat([start.expand(2, 1, -1), start + steps.cumsum(1)], dim=1)  # (2, epochs + 1, P)
        extra["upstream"] = mtt.Trajectories(params, *mtt.layout(net))
    # Timestamps at checkpoints: `on_checkpoint` gets CPU copies of the state, which synchronises the
    # device. DM checkpoints every `every` iterations to amortise that copy over its short iterations.
    every = 50 if method == "dm" else 1
    stamps: list[float] = []
    cfg = method_config(method, args, every * (args.warmup + args.iterations))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    METHODS[method](
        images,
        labels,
        NUM_CLASSES,
        cfg,
        net_factory,
        torch.Generator().manual_seed(1),
        dsa=dsa_config(shape),
        compute=ComputeConfig(args.precision, args.compile),
        on_checkpoint=lambda state: stamps.append(time.perf_counter()),
        checkpoint_every=every,
        progress=False,
        **extra,
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    kept = stamps[args.warmup - 1 :]  # stamps[k] = end of interval k + 1
    intervals = [(b - a) / every for a, b in zip(kept[:-1], kept[1:], strict=True)]
    return statistics.median(intervals), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="dc,dsa,dm")
    parser.add_argument("--shapes", default="mnist,cifar")
    parser.add_argument("--iterations", type=int, default=3, help="timed intervals (DM: of 50 iterations)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded intervals, >= 1")
    parser.add_argument("--width", type=int, default=PAPER["width"])
    parser.add_argument("--ipc", type=int, default=PAPER["ipc"])
    parser.add_argument("--outer-loop", type=int, default=PAPER["outer_loop"])
    parser.add_argument("--inner-loop", type=int, default=PAPER["inner_loop"])
    parser.add_argument("--batch-real", type=int, default=PAPER["batch_real"])
    parser.add_argument("--syn-steps", type=int, default=MTT_PAPER["syn_steps"], help="MTT")
    parser.add_argument("--expert-epochs", type=int, default=MTT_PAPER["expert_epochs"], help="MTT")
    parser.add_argument("--max-start-epoch", type=int, default=MTT_PAPER["max_start_epoch"], help="MTT")
    parser.add_argument("--batch-syn", type=int, default=MTT_PAPER["batch_syn"], help="MTT (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="compute.precision")
    parser.add_argument("--compile", action="store_true", help="compute.compile (acts on the CPU only)")
    parser.add_argument("--json", type=str, default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    used = {k: getattr(args, k) for k in PAPER}
    mtt_used = {k: getattr(args, k) for k in MTT_PAPER}
    label = "paper" if used == PAPER and ("mtt" not in args.methods or mtt_used == MTT_PAPER) else "reduced"
    if "mtt" in args.methods:
        used.update(mtt_used)

    print(f"settings: {used} ({label}), precision {args.precision}; torch {torch.__version__}")
    rows = []
    print("| device | method | shape | width | ipc | outer/inner | batch_real | s / outer iter | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for shape in args.shapes.split(","):
            seconds, peak = time_case(method, shape, args, device)
            loops = {"dm": "-", "mtt": f"{args.syn_steps} steps"}.get(
                method, f"{args.outer_loop}/{args.inner_loop}"
            )
            print(
                f"| {device_name(device)} | {method} | {shape} | {args.width} | {args.ipc} | {loops} "
                f"| {args.batch_real} | {seconds:.4g} ({label}) | {peak:.0f} |",
                flush=True,
            )
            rows.append(
                {
                    "device": device_name(device),
                    "method": method,
                    "shape": shape,
                    **used,
                    "settings": label,
                    "precision": args.precision,
                    "seconds_per_outer_iteration": seconds,
                    "peak_mib": peak,
                }
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
