"""The bias-amplification diagnostic (the `bias_classifier` stage; docs/protocol.md §9).

A bias-only classifier (trained to predict the ATTRIBUTE with (class, attribute)-balanced sampling, so
class content carries no signal) labels each synthetic image; `bias_amplification` reports, per class,
the share labelled with the class's aligned attribute, against the same share in the real training set
(about the bias ratio). A synthetic set above the reference amplifies the bias, below it dampens it.
Used by the evaluate stages for their metrics; never to distil.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasdd import artifacts
from biasdd.config import Config, PositiveFloat, PositiveInt, from_dict, section
from biasdd.training.compute import FP32, ComputeConfig
from biasdd.training.data import NUM_CLASSES, load_split, train_stats
from biasdd.training.nets import build_network
from biasdd.training.runtime import RunConfig, derive_seed, net_factory, run_config, start
from biasdd.training.trainer import predict_logits, train_steps


@dataclass(frozen=True)
class BiasClassifierConfig(Config):
    """The `bias_classifier` params section."""

    SECTION: ClassVar[str] = "bias_classifier"

    steps: PositiveInt  # Adam steps with (class, attribute)-balanced batches
    batch_size: PositiveInt
    lr: PositiveFloat  # Adam learning rate
    width: PositiveInt  # network width (the `model.net` architecture)
    reference_limit: PositiveInt  # real training images scored for the reference share (spread evenly)


class _GroupBalancedDraw:
    """Draws indices with every present (class, attribute) group equally likely, uniformly within it."""

    def __init__(self, labels: Tensor, attributes: Tensor, num_classes: int) -> None:
        group = (labels.long() * num_classes + attributes.long()).cpu()
        counts = torch.bincount(group, minlength=num_classes**2)
        self.present = torch.nonzero(counts).squeeze(1)  # (G,) ids of non-empty groups
        self.counts = counts[self.present]
        self.starts = (torch.cumsum(counts, 0) - counts)[self.present]
        self.order = torch.argsort(group, stable=True).to(labels.device)

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        device = generator.device
        pick = torch.randint(len(self.present), (n,), generator=generator, device=device)
        within = torch.rand(n, generator=generator, device=device)
        counts, starts = self.counts.to(device)[pick], self.starts.to(device)[pick]
        offset = (within * counts).long().clamp_max(counts - 1)
        return self.order[(starts + offset).to(self.order.device)]


def train_bias_classifier(
    images: Tensor,
    labels: Tensor,
    attributes: Tensor,
    num_classes: int,
    cfg: BiasClassifierConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    progress: bool = True,
    compute: ComputeConfig = FP32,
) -> nn.Module:
    """A bias-only classifier: predicts the ATTRIBUTE (K-way) with plain CE on batches where every
    (class, attribute) group is equally likely, so the class content carries no information about the
    attribute and only the bias signal (colour, corruption) can be learnt. Uses attribute labels, but only
    as a diagnostic, never to distil. `net_factory` must give K = num_classes outputs. Caveat: at bias
    ratio 1.0 only the aligned groups exist and class content cannot be told apart from the attribute.
    Returns the network in eval mode.
    """
    if attributes.shape != labels.shape or labels.shape != images.shape[:1]:
        raise ValueError("images, labels and attributes must agree on N")
    draw = _GroupBalancedDraw(labels, attributes, num_classes)
    net = net_factory(generator)
    return train_steps(
        net,
        images,
        attributes.to(images.device),
        draw,
        F.cross_entropy,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        generator,
        "bias classifier",
        progress,
        compute,
    )


def strided_subset(num: int, limit: int) -> Tensor:
    """(min(num, limit),) indices spread evenly over 0..num-1. Not the first `limit`: attributes are
    assigned in dataset order within each class (docs/protocol.md §2), so a prefix over-represents the
    low attribute ids and would skew the reference share."""
    if limit >= num:
        return torch.arange(num)
    return torch.linspace(0, num - 1, limit).round().long()


# --- the diagnostic -------------------------------------------------------------------------------------


def aligned_share(predicted: Tensor, labels: Tensor, num_classes: int) -> dict[str, float | list | None]:
    """Per class, the share of samples whose predicted attribute is the class's aligned one (== class).

    {"per_class": [share or None (no sample)], "mean": mean over the classes present}.
    """
    if predicted.shape != labels.shape:
        raise ValueError("predicted and labels must have one shape")
    labels = labels.to(predicted.device).long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=(predicted == labels).double(), minlength=num_classes)
    per_class = [float(hits[c] / counts[c]) if counts[c] > 0 else None for c in range(num_classes)]
    present = [v for v in per_class if v is not None]
    return {"per_class": per_class, "mean": sum(present) / len(present) if present else None}


def bias_amplification(
    classifier: nn.Module, syn_images: Tensor, syn_labels: Tensor, num_classes: int, batch_size: int = 1024
) -> dict[str, float | list | None]:
    """The share of each class's synthetic images that the bias-only classifier labels with the class's
    aligned attribute, and its mean over classes (`aligned_share`). Applied to the real training set it
    gives the reference (about the bias ratio, times the classifier's accuracy); a synthetic set above
    the reference amplifies the bias, below it dampens it. Images in the classifier's input space (the
    normalised space the sets are distilled in), moved to its device in batches."""
    device = next(classifier.parameters()).device
    predicted = torch.cat(
        [
            predict_logits(classifier, syn_images[start : start + batch_size].to(device), batch_size).argmax(
                1
            )
            for start in range(0, syn_images.shape[0], batch_size)
        ]
    )
    return aligned_share(predicted.cpu(), syn_labels.cpu(), num_classes)


def attribute_accuracy(
    classifier: nn.Module, images: Tensor, attributes: Tensor, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of the bias-only classifier on the attribute (its own quality check)."""
    device = next(classifier.parameters()).device
    predicted = torch.cat(
        [
            predict_logits(classifier, images[start : start + batch_size].to(device), batch_size).argmax(1)
            for start in range(0, images.shape[0], batch_size)
        ]
    )
    return float((predicted.cpu() == attributes.cpu()).double().mean())


def summarise_amplification(
    per_set: Sequence[dict[str, float | list | None]], reference: float | None
) -> dict[str, object]:
    """Metrics for one method's synthetic sets: mean/std/values of the mean aligned share over sets, the
    per-class share averaged over sets, the real-set reference and the amplification (share - reference)."""
    means = [s["mean"] for s in per_set if s["mean"] is not None]
    mean = sum(means) / len(means) if means else None
    std = math.sqrt(sum((v - mean) ** 2 for v in means) / len(means)) if means else None  # type: ignore[operator]
    num_classes = len(per_set[0]["per_class"]) if per_set else 0  # type: ignore[arg-type]
    per_class = []
    for c in range(num_classes):
        values = [s["per_class"][c] for s in per_set if s["per_class"][c] is not None]  # type: ignore[index]
        per_class.append(sum(values) / len(values) if values else None)
    return {
        "aligned_share": {"mean": mean, "std": std, "values": [s["mean"] for s in per_set]},
        "aligned_share_per_class": per_class,
        "real_aligned_share": reference,
        "amplification": None if mean is None or reference is None else mean - reference,
    }


# --- the stage --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierSetup:
    run: RunConfig
    classifier: BiasClassifierConfig

    def provenance(self) -> dict[str, Any]:
        return {**self.run.provenance(), "config": dataclasses.asdict(self.classifier)}


def configure(params: Mapping[str, Any]) -> ClassifierSetup:
    """Validate every param the bias_classifier stage uses."""
    cfg = from_dict(BiasClassifierConfig, section(params, "bias_classifier"), "bias_classifier")
    return ClassifierSetup(run_config(params), cfg)


def run(
    setup: ClassifierSetup, data_path: Path, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(checkpoint, metrics, details) of the bias-only attribute classifier. The checkpoint holds what
    `load_bias_classifier` needs plus the real training set's aligned share (the reference); metrics
    hold its attribute accuracy (a DVC metric), details the reference shares (a sidecar file)."""
    setup = dataclasses.replace(setup, run=start(setup.run))  # the device: leased now, not when validated
    cfg = setup.classifier
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    device = setup.run.device
    images = train.images.to(device)
    channels, im_size = images.shape[1], images.shape[-1]
    generator = torch.Generator().manual_seed(derive_seed(setup.run.seed, "bias_classifier"))
    factory = net_factory(setup.run, channels, im_size, width=cfg.width)
    classifier = train_bias_classifier(
        images,
        train.labels,
        train.attributes,
        NUM_CLASSES,
        cfg,
        factory,
        generator,
        progress,
        setup.run.compute,
    )
    subset = strided_subset(len(train.labels), cfg.reference_limit)
    reference = bias_amplification(classifier, train.images[subset], train.labels[subset], NUM_CLASSES)
    test = load_split(data_path, "test_uniform", mean, std)
    accuracy = attribute_accuracy(classifier, test.images, test.attributes)
    checkpoint = {
        "artifact": "bias_classifier",
        "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        "net": setup.run.model.net,
        "width": cfg.width,
        "channels": channels,
        "im_size": im_size,
        "reference": reference,
        "provenance": setup.provenance(),
    }
    # the real set's share is metrics/bias/full.json's `share` (the evaluate_full stage reports it)
    metrics = {"attr_acc": accuracy}  # attribute accuracy on test_uniform
    details = {
        "attribute_accuracy_test_uniform": accuracy,
        "real_aligned_share": reference["mean"],
        "real_aligned_share_per_class": reference["per_class"],
        "n_reference": int(subset.numel()),
        "provenance": setup.provenance(),
    }
    return checkpoint, metrics, details


def load_bias_classifier(path: Path, device: str) -> tuple[nn.Module, float | None]:
    """(classifier in eval mode on `device`, the real set's mean aligned share)."""
    saved = artifacts.load_checkpoint(path, kind="bias_classifier")
    assert saved is not None  # with a kind, a missing file is an ArtifactError
    net = build_network(saved["net"], saved["channels"], NUM_CLASSES, saved["im_size"], saved["width"])
    net.load_state_dict(saved["state_dict"])
    return net.to(device).eval(), saved["reference"]["mean"]


def amplification_metrics(classifier_path: Path, synthetic_path: Path | None, device: str) -> dict[str, Any]:
    """For a synthetic set, the share of each class's synthetic images the bias-only classifier labels
    with the class's aligned attribute (per set, then mean/std over sets) against the real set's share;
    for the full set, the reference alone."""
    classifier, reference = load_bias_classifier(classifier_path, device)
    if synthetic_path is None:
        return {"real_aligned_share": reference}
    per_set = []
    for group in sorted(g for g in artifacts.list_groups(synthetic_path) if g.startswith("repeat_")):
        data = artifacts.read_h5(synthetic_path, group, ("images", "labels"), kind="synthetic")
        per_set.append(
            bias_amplification(
                classifier, torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]), NUM_CLASSES
            )
        )
    return summarise_amplification(per_set, reference)
