"""Speed of evaluation training (`biasdd.training.trainer.train_networks`) on random data of the
protocol's shapes.

(a) synthetic set: R networks trained at once for E epochs on 500 images of 3x32x32 (IPC 50 x 10
    classes; 2 batches of 256 per epoch), projected to the protocol's 1000 epochs;
(b) full-set baseline: seconds per epoch per network on N images of 3x28x28 (CMNIST-DD, 60,000),
    projected to the protocol's 150 epochs.

Each measurement runs a short warm-up first (allocator, cuDNN autotuning, lazy init) and synchronises
the device before reading the clock. Rows are printed as markdown with the device and all settings,
so a reduced run (fewer epochs, smaller width or N) is labelled as such.

Run (paper settings, one H100/H200; expected cost about 1 minute, targets <= 10 s for (a) at 1000
epochs and <= 2 min per network for (b) at 150 epochs):
    python benchmarks/eval_speed.py --device cuda --epochs 200 --full-epochs 1
--precision bf16 times bf16 autocast; --compile turns on `compute.compile` (it acts on the CPU only).
Reduced CPU run (about 30 s on 2 cores):
    python benchmarks/eval_speed.py --device cpu --epochs 5 --width 32 --full-n 2048 --full-epochs 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from biasdd.training.compute import FP32, ComputeConfig
from biasdd.training.nets import build_network
from biasdd.training.trainer import TrainConfig, train_networks

NUM_CLASSES = 10
SYNTHETIC_N = 500  # IPC 50 x 10 classes
PAPER_EPOCHS_SYNTHETIC = 1000
PAPER_EPOCHS_FULL = 150


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(
    num_samples: int,
    im_size: int,
    nets: int,
    epochs: int,
    width: int,
    device: torch.device,
    compute: ComputeConfig = FP32,
    batched: bool | None = None,
) -> float:
    """Seconds to train `nets` networks for `epochs` epochs (after a one-epoch warm-up)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(num_samples, 3, im_size, im_size, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g).to(device)

    def factory(generator: torch.Generator) -> torch.nn.Module:
        return build_network("convnet3", 3, NUM_CLASSES, im_size, width=width, generator=generator)

    def run(run_epochs: int) -> None:
        milestones = (run_epochs // 2,) if run_epochs >= 2 else ()
        cfg = TrainConfig(
            epochs=run_epochs,
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=256,
            lr_milestones=milestones,
            lr_gamma=0.1,
        )
        generators = [torch.Generator().manual_seed(s) for s in range(nets)]
        ensemble = train_networks(
            images,
            labels,
            factory,
            cfg,
            generators,
            progress=False,
            compute=compute,
            batched=batched,
        )
        assert ensemble.train_loss is not None
        ensemble.train_loss.sum().item()  # wait for the device

    run(1)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    run(epochs)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nets", type=int, default=3, help="networks trained at once in (a)")
    parser.add_argument("--epochs", type=int, default=200, help="epochs timed in (a)")
    parser.add_argument("--width", type=int, default=128, help="ConvNet width (protocol: 128)")
    parser.add_argument("--full-epochs", type=int, default=1, help="epochs timed in (b)")
    parser.add_argument("--full-n", type=int, default=60_000, help="training-set size in (b)")
    parser.add_argument("--full-nets", type=int, default=1, help="networks trained at once in (b)")
    parser.add_argument("--compile", action="store_true", help="compute.compile (acts on the CPU only)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="compute.precision")
    parser.add_argument("--json", type=str, default="", help="also write the rows to this JSON file")
    parser.add_argument(
        "--mode",
        choices=["auto", "vmapped", "one-by-one"],
        default="auto",
        help="auto = the library's default: vmapped on accelerators, one network after another on the CPU",
    )
    parser.add_argument("--skip-full", action="store_true", help="time (a) only")
    args = parser.parse_args()

    device = torch.device(args.device)
    name = device_name(device)
    reduced = args.width != 128 or args.full_n != 60_000
    label = " (REDUCED settings, not the protocol's)" if reduced else ""
    compiled = (", torch.compile on" if args.compile else "") + f", {args.precision}"
    setting = ComputeConfig(args.precision, args.compile)
    rows = []
    print(f"torch {torch.__version__}, device {name}{label}{compiled}\n")
    print("| work | device | settings | measured | projected |")
    print("|---|---|---|---|---|")

    batched = {"auto": None, "vmapped": True, "one-by-one": False}[args.mode]
    how = {True: "vmapped at once", False: "one after another"}[
        batched if batched is not None else device.type != "cpu"
    ]
    seconds = time_training(SYNTHETIC_N, 32, args.nets, args.epochs, args.width, device, setting, batched)
    rows.append(
        {
            "work": "synthetic",
            "device": name,
            "nets": args.nets,
            "epochs": args.epochs,
            "width": args.width,
            "precision": args.precision,
            "seconds": seconds,
            "projected_1000_epochs_s": PAPER_EPOCHS_SYNTHETIC * seconds / args.epochs,
        }
    )
    per_epoch = seconds / args.epochs
    print(
        f"| (a) synthetic set, {args.nets} nets {how} | {name} | N={SYNTHETIC_N} 3x32x32, width "
        f"{args.width}, batch 256, {args.epochs} epochs | {seconds:.2f} s ({1e3 * per_epoch:.1f} ms/epoch, "
        f"{1e3 * per_epoch / args.nets:.1f} ms/epoch/net) | {PAPER_EPOCHS_SYNTHETIC} epochs: "
        f"{PAPER_EPOCHS_SYNTHETIC * per_epoch:.1f} s for {args.nets} nets |"
    )
    if not args.skip_full:
        seconds = time_training(
            args.full_n, 28, args.full_nets, args.full_epochs, args.width, device, setting, batched
        )
        rows.append(
            {
                "work": "full",
                "device": name,
                "n": args.full_n,
                "epochs": args.full_epochs,
                "width": args.width,
                "precision": args.precision,
                "seconds": seconds,
                "projected_150_epochs_min_per_net": PAPER_EPOCHS_FULL
                * seconds
                / args.full_epochs
                / args.full_nets
                / 60,
            }
        )
        per_epoch_per_net = seconds / args.full_epochs / args.full_nets
        print(
            f"| (b) full set, {args.full_nets} net(s) {how} | {name} | N={args.full_n} 3x28x28, width "
            f"{args.width}, batch 256, {args.full_epochs} epoch(s) | {per_epoch_per_net:.2f} s/epoch/net | "
            f"{PAPER_EPOCHS_FULL} epochs: {PAPER_EPOCHS_FULL * per_epoch_per_net / 60:.1f} min/net "
            f"(x {60_000 / args.full_n:.1f} for N=60,000 if reduced) |"
        )

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
