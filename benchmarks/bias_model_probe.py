"""How the bias model's pseudo-groups separate bias from class, by bias ratio (docs/protocol.md §9).

    python benchmarks/bias_model_probe.py --ratios 0.95 0.8 0.5 0.1 0 --out /tmp/probe
    # ~30 s per ratio on 2 CPU cores at the quick budget's bias model: builds each biased set from MNIST
    python benchmarks/bias_model_probe.py --ratios 0.95 0.1 0 --out /tmp/probe --set steps=200
    # another bias model (any key of the bias_model params section)
    python benchmarks/bias_model_probe.py --ratios 0.95 --out /tmp/probe-s2 --seed 2   # another seed

For each bias ratio: builds CMNIST-DD (params.yaml's settings, that ratio) with the pipeline's own
stages, trains the bias model as the bias_model stage does, and prints the mean confidence of its
(label, predicted class) groups, how many groups a threshold keeps, and the inference measures of
`biasdd.pipeline.bias_model.inference_metrics` for per-sample and per-group thresholds and for the
clustered rule (`bias_model.grouping: clustered`: one threshold on all the mistakes), how far the
model's log-probabilities tell the attributes apart (`clustered_diagnostics`, at the first threshold),
and which class the model predicts for the bias-conflicting samples of each attribute (rows: the true
attribute; a biased model that learnt every attribute has them on the diagonal).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from biasdd.params import load_params
from biasdd.pipeline import bias_model
from biasdd.training.data import load_split, train_stats
from biasdd.training.runtime import derive_seed, net_factory, start
from biasdd.vocab import NUM_CLASSES

REPO = Path(__file__).resolve().parents[1]


def stage(name: str, *args: str) -> None:
    env = {"PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py"), *args], check=True, env=env)


def clustered_diagnostics(probs: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor,
                          pseudo: torch.Tensor) -> None:  # fmt: skip
    """How far the log-probabilities tell the attributes apart: the share of bias-conflicting samples
    nearest their own true (class, attribute) group's centre; and, per class, the bias-conflicting samples
    the clustered rule leaves in the class's own group, against its bias-aligned ones, by distance from
    that group's centre (AUC; how many are among the 2n farthest, n of them)."""
    points = probs.clamp_min(1e-6).log()
    right = total = 0
    for c in range(NUM_CLASSES):
        of_class = labels == c
        present = [a for a in range(NUM_CLASSES) if bool((of_class & (attributes == a)).any())]
        centres = torch.stack([points[of_class & (attributes == a)].mean(0) for a in present])
        mask = of_class & (attributes != c)
        nearest = torch.tensor(present)[torch.cdist(points[mask], centres).argmin(1)]
        right += int((nearest == attributes[mask]).sum())
        total += int(mask.sum())
    print(f"  log-probabilities: {right / max(total, 1):.3f} of the bias-conflicting samples nearest "
          f"their own group's centre")  # fmt: skip
    for c in range(NUM_CLASSES):
        own = (labels == c) & (pseudo == c)
        hidden = attributes[own] != c
        n = int(hidden.sum())
        if n == 0 or n == int(own.sum()):
            continue
        distance = (points[own] - points[own].mean(0)).norm(dim=1)
        farthest = hidden[distance.argsort(descending=True)[: 2 * n]]
        auc = bias_model.auc(distance[hidden], distance[~hidden])
        print(f"  class {c}: {n} bias-conflicting samples left in its own group; AUC {auc:.3f} by distance "
              f"from its centre, {int(farthest.sum())} of its {2 * n} farthest")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.95, 0.8, 0.5, 0.1, 0.0])
    parser.add_argument("--out", type=Path, required=True, help="a scratch folder for the biased sets")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.7, 0.8, 0.9])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a bias_model param for this probe, e.g. steps=200 (repeatable)")  # fmt: skip
    parser.add_argument("--seed", type=int, help="the run's seed (default: params.yaml's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base.h5"
    for ratio in args.ratios:
        params = load_params(REPO / "params.yaml")
        params["bias_ratio"] = ratio
        if args.seed is not None:
            params["seed"] = args.seed
        for assignment in args.set:
            key, _, value = assignment.partition("=")
            params["bias_model"][key] = yaml.safe_load(value)
        folder = args.out / f"rho{ratio:g}"
        folder.mkdir(exist_ok=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        if not base.exists():
            embedded = str(REPO / "data/embedded")
            stage(
                "download",
                "--params",
                str(folder / "params.yaml"),
                "--embedded",
                embedded,
                "--out",
                str(base),
            )
        stage("bias_inject", "--params", str(folder / "params.yaml"), "--base", str(base),
              "--out", str(folder / "biased.h5"))  # fmt: skip
        setup = bias_model.configure(params)
        run = start(setup.run)
        mean, std = train_stats(folder / "biased.h5")
        train = load_split(folder / "biased.h5", "train", mean, std)
        generator = torch.Generator().manual_seed(derive_seed(run.seed, "bias_model"))
        factory = net_factory(run, train.images.shape[1], train.images.shape[-1], width=setup.model.width)
        probs = bias_model.train_biased_model(train.images, train.labels, setup.model, factory, generator,
                                              False, run.compute)  # fmt: skip
        top, predicted = probs.max(1)
        pairs = train.labels * NUM_CLASSES + predicted
        counts = torch.bincount(pairs, minlength=NUM_CLASSES**2)
        confidence = torch.bincount(pairs, weights=top.double(), minlength=NUM_CLASSES**2) / counts.clamp_min(
            1
        )
        other = torch.tensor([i // NUM_CLASSES != i % NUM_CLASSES for i in range(NUM_CLASSES**2)]) & (
            counts > 0
        )
        quantiles = torch.quantile(confidence[other].float(), torch.tensor([0.1, 0.5, 0.9])).tolist()
        print(f"rho {ratio:g}: {int(other.sum())} (label, predicted) groups other than the class's own; mean "
              f"confidence 10/50/90%: {', '.join(f'{q:.3f}' for q in quantiles)}")  # fmt: skip
        wrong = predicted != train.labels
        if wrong.any():
            print(f"  mean confidence over all {int(wrong.sum())} mistakes: {float(top[wrong].mean()):.3f}")
        scores = bias_model.bias_scores(probs, train.labels)
        min_group = setup.model.min_group
        clustered = {}  # threshold -> the clustered rule's pseudo-attributes
        for threshold in args.thresholds:
            clustered[threshold] = bias_model.clustered_pseudo_attributes(
                probs, train.labels, threshold, min_group
            )
            rules = {
                f"per group >= {threshold:g}": bias_model.pseudo_attributes(
                    probs, train.labels, threshold, min_group
                ),
                f"per sample >= {threshold:g}": torch.where(
                    wrong & (top >= threshold), predicted, train.labels
                ),
                f"clustered, mistakes >= {threshold:g}": clustered[threshold],
            }
            for name, pseudo in rules.items():
                found = bias_model.inference_metrics(scores, pseudo, train.labels, train.attributes)
                shown = ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in found.items()
                )
                print(f"  {name}: {shown}")
        conflicting = train.attributes != train.labels
        if conflicting.any():
            clustered_diagnostics(probs, train.labels, train.attributes, clustered[args.thresholds[0]])
            cells = train.attributes[conflicting].long() * NUM_CLASSES + predicted[conflicting]
            confusion = torch.bincount(cells, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
            print("  bias-conflicting samples, true attribute (row) -> predicted class (column):")
            for attribute, row in enumerate(confusion.tolist()):
                print(f"    {attribute}: {' '.join(f'{count:4d}' for count in row)}")


if __name__ == "__main__":
    main()
