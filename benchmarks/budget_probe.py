"""One probe of a budget setting on real CMNIST-DD: distil with one method (or train the full set),
evaluate, print accuracies and times as one JSON line. What the quick budget was designed with.

    python benchmarks/budget_probe.py --data data/biased.h5 --method dm --cfg '{"iterations": 300}'
    python benchmarks/budget_probe.py --data data/biased.h5 --method full --full-epochs 3 --full-milestones ""

`--data`: a biased.h5 (e.g. `dvc exp run -S bias_ratio=0.1 bias_inject`, then copy data/biased.h5). The
method's settings start from the quick budget's first design (IPC 10, batch_real 64, DC/DSA 10 outer
iterations of loops 10/50, DM 300 iterations, real init, DM lr_img 1, DC/DSA 0.1) and `--cfg`
overrides any of them; evaluation is `--repeats` networks of ConvNet-3 width 32 trained `--epochs`
epochs (lr decay at half) with the method's augmentation (DSA for DSA/DM, DC's for DC), bf16 and
torch.compile on the CPU. Cost: seconds (DM) to minutes (DC/DSA).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from biasdd.distill import METHODS
from biasdd.pipeline.evaluate import evaluate_ensemble
from biasdd.training.augment import DCAugConfig, DSAConfig, dc_augment, dsa_augment
from biasdd.training.compute import ComputeConfig
from biasdd.training.data import NUM_CLASSES, load_split, train_stats
from biasdd.training.nets import build_network
from biasdd.training.trainer import TrainConfig, train_networks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--method", default="dm", choices=["dc", "dsa", "dm", "full"])
    p.add_argument("--cfg", default="{}", help="JSON overrides of the method's settings")
    p.add_argument("--epochs", type=int, default=300, help="evaluation epochs on the synthetic set")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="evaluation networks")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--full-n", type=int, default=60000)
    p.add_argument("--full-epochs", type=int, default=3)
    p.add_argument("--full-milestones", default=None, help="comma-separated; default: at 2/3 of the epochs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    mean, std = train_stats(a.data)
    compute = ComputeConfig(precision=a.precision, compile=bool(a.compile))
    dsa = DSAConfig("color_crop_cutout_scale_rotate", 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)

    def factory(g: torch.Generator) -> torch.nn.Module:
        return build_network("convnet3", 3, NUM_CLASSES, 28, a.width, generator=g)

    start = time.perf_counter()
    train = load_split(a.data, "train", mean, std)
    distill_s = 0.0
    if a.method == "full":
        images, labels = train.images[: a.full_n], train.labels[: a.full_n]
        milestones = [max(1, a.full_epochs * 2 // 3)] if a.full_epochs > 1 else []
        if a.full_milestones is not None:
            milestones = [int(m) for m in a.full_milestones.split(",") if m]
        cfg = TrainConfig(a.full_epochs, 0.01, 0.9, 5e-4, 256, tuple(milestones), 0.1)
        augment = None
    else:
        values = dict(ipc=10, iterations=300 if a.method == "dm" else 10, momentum_img=0.5)
        values.update(lr_img=1.0 if a.method == "dm" else 0.1)
        values.update(batch_real=64, init="real")
        if a.method != "dm":
            values.update(outer_loop=10, inner_loop=50, lr_net=0.01, batch_train=256)
        values.update(json.loads(a.cfg))
        method_cfg = METHODS[a.method].config(**values)
        generator = torch.Generator().manual_seed(a.seed)
        result = METHODS[a.method](
            train.images, train.labels, NUM_CLASSES, method_cfg, factory, generator,
            dsa=dsa, compute=compute, progress=False,
        )  # fmt: skip
        distill_s = time.perf_counter() - start
        images, labels = result.images, result.labels
        cfg = TrainConfig(a.epochs, 0.01, 0.9, 5e-4, 256, (a.epochs // 2,), 0.1)
        if a.method == "dc":
            dc_cfg = DCAugConfig(4, 0.2, 45)

            def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return dc_augment(x, g, torch.zeros(3), dc_cfg)
        else:

            def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return dsa_augment(x, dsa, g)

    start = time.perf_counter()
    generators = [torch.Generator().manual_seed(1000 + r) for r in range(a.repeats)]
    ensemble = train_networks(
        images, labels, factory, cfg, generators, augment=augment, progress=False, compute=compute
    )
    eval_s = time.perf_counter() - start
    splits = {}
    for split in ("test_conflicting", "test_uniform"):
        test = load_split(a.data, split, mean, std)
        splits[split] = (test.images, test.labels, test.attributes)
    scores = evaluate_ensemble(ensemble, splits, NUM_CLASSES, compute=compute)
    accuracy = {s: [round(m["accuracy"] * 100, 1) for m in scores[s]["per_repeat"]] for s in splits}
    line = {
        "data": str(a.data),
        "method": a.method,
        "cfg": a.cfg,
        "epochs": a.epochs,
        "distill_s": round(distill_s, 1),
    }
    print(json.dumps({**line, "eval_s": round(eval_s, 1), **accuracy}), flush=True)


if __name__ == "__main__":
    main()
