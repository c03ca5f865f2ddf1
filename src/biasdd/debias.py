"""Biased dataset distillation (issue 6): min_S D(S, A_g) - lambda * D(S, A_b), for every method.

The study (Lu et al., 2024) ends by defining it and leaves it to future work. Here:

- `A_g`, the unbiased target, is each class's real-side target (DM: mean embedding; DC/DSA: gradient of
  the mean CE) taken under per-sample weights that undo the bias:
  - `groups` (attribute labels): w_i = 1 / n_(y_i, a_i), so every (class, attribute) group of a class
    weighs the same (group-balanced matching);
  - `inferred` (no attribute labels): a deliberately biased model, trained with generalized cross-entropy
    (GCE, q = 0.7; Zhang & Sabuncu 2018, as LfF, Nam et al. 2020), scores every training sample by
    s_i = 1 - p_b(y_i | x_i); w_i = max(s_i, floor)^power, so the samples it finds hard (the likely
    bias-conflicting ones) dominate (JTT-style upweighting, Liu et al. 2021, with GCE's sharper split).
  The methods draw the real batch with probability proportional to w (importance sampling; see
  `distill.common.WeightedClassSampler`), which estimates the weighted target with little variance.
- `A_b`, the bias-aligned target, comes from a second real batch drawn from the aligned weights
  (labelled: attribute == label; inferred: max(1 - s_i, floor)^power), and lambda (`repulsion`) pushes
  the synthetic set away from it through a bounded term (DM: a capped squared distance; DC/DSA: the
  cosine gradient distance, bounded per row), see `dm.debiased_embedding_loss`, `dc.debiased_matching_loss`.
- `none` is today's code path (the methods get `debias=None`), byte-identical.

A bias-amplification diagnostic comes with it: a bias-only classifier (trained to predict the ATTRIBUTE
with (class, attribute)-balanced sampling, so class content carries no signal) labels each synthetic
image; `bias_amplification` reports, per class, the share labelled with the class's aligned attribute.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from biasdd.distill.common import DebiasTargets

logger = logging.getLogger(__name__)

MODES = ("none", "groups", "inferred")


def _number(where: str, value: object, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high  # type: ignore[operator]
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{where}: {value!r} is not valid; expected a number in {interval}")


def _positive_int(where: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {value!r} is not valid; expected an integer >= 1")


@dataclass(frozen=True)
class DebiasConfig:
    """The `debias` params section (defaults in params.yaml): orthogonal to the method (dc, dsa, dm)."""

    mode: Literal["none", "groups", "inferred"]  # none = the study's plain methods
    repulsion: float  # lambda of the second term, >= 0; 0 = reweighting only
    max_shift: float  # DM: repulsion stops once |mu_S - mu_b| >= (1 + max_shift) |mu_g - mu_b|
    score_floor: float  # inferred: scores below are raised to it (every sample keeps some weight)
    score_power: float  # inferred: w = max(s, floor) ** power; > 1 sharpens toward the hard samples

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"debias.mode: {self.mode!r} is not valid; choose one of {list(MODES)}")
        _number("debias.repulsion", self.repulsion, 0.0)
        _number("debias.max_shift", self.max_shift, 0.0, low_open=True)
        _number("debias.score_floor", self.score_floor, 0.0, 1.0, low_open=True)
        _number("debias.score_power", self.score_power, 0.0, low_open=True)
        if self.mode == "none" and self.repulsion > 0:
            raise ValueError(
                f"debias.repulsion: {self.repulsion!r} needs debias.mode 'groups' or 'inferred' (the "
                "bias-aligned samples come from attribute labels or the biased model); mode is 'none'"
            )


@dataclass(frozen=True)
class BiasModelConfig:
    """The deliberately biased model of `inferred` (the `bias_model` params section)."""

    gce_q: float  # GCE q, in (0, 1] (0.7: Zhang & Sabuncu 2018; LfF, Nam et al. 2020)
    steps: int  # Adam steps; few on purpose: a long run memorises the conflicting samples too
    batch_size: int
    lr: float  # Adam learning rate (1e-3, LfF)
    width: int  # network width (the `model.net` architecture); a narrow net is cheaper and more biased
    batch_score: int  # scoring batch (no gradients)

    def __post_init__(self) -> None:
        _number("bias_model.gce_q", self.gce_q, 0.0, 1.0, low_open=True)
        for name in ("steps", "batch_size", "width", "batch_score"):
            _positive_int(f"bias_model.{name}", getattr(self, name))
        _number("bias_model.lr", self.lr, 0.0, low_open=True)


@dataclass(frozen=True)
class BiasClassifierConfig:
    """The bias-only classifier of the amplification diagnostic (the `bias_classifier` params section)."""

    steps: int  # Adam steps with (class, attribute)-balanced batches
    batch_size: int
    lr: float  # Adam learning rate
    width: int  # network width (the `model.net` architecture)
    reference_limit: int  # real training images scored for the reference share (the first n)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "width", "reference_limit"):
            _positive_int(f"bias_classifier.{name}", getattr(self, name))
        _number("bias_classifier.lr", self.lr, 0.0, low_open=True)


# --- per-sample weights -------------------------------------------------------------------------------


def _check_labels(labels: Tensor, num_classes: int, other: Tensor, name: str) -> None:
    if other.shape != labels.shape:
        raise ValueError(f"{name}: shape {tuple(other.shape)} does not match labels {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")


def group_weights(labels: Tensor, attributes: Tensor, num_classes: int) -> Tensor:
    """(N,) float64: w_i = 1 / n_(y_i, a_i), so every (class, attribute) group present in a class weighs
    the same. Exactly uniform within a class when its groups are equally large (then `none`'s path runs)."""
    _check_labels(labels, num_classes, attributes, "attributes")
    if attributes.numel() and (int(attributes.min()) < 0 or int(attributes.max()) >= num_classes):
        raise ValueError(f"attributes must lie in 0..{num_classes - 1}")
    group = labels.long() * num_classes + attributes.long()  # (N,)
    counts = torch.bincount(group, minlength=num_classes**2).double()
    return 1.0 / counts[group]


def aligned_from_attributes(labels: Tensor, attributes: Tensor) -> Tensor:
    """(N,) float64: 1 for bias-aligned samples (attribute == label), else 0."""
    if attributes.shape != labels.shape:
        raise ValueError(f"attributes: shape {tuple(attributes.shape)} does not match labels")
    return (attributes == labels).double()


def score_weights(scores: Tensor, floor: float, power: float) -> Tensor:
    """(N,) float64 weights max(s, floor) ** power from scores s in [0, 1] (only ratios within a class
    matter to the samplers). The floor keeps every sample in the support: the target stays a mixture,
    not the conflicting samples alone, and a sample the biased model got wrong by chance still counts."""
    scores = scores.detach().double()
    if not torch.isfinite(scores).all():
        raise ValueError("scores: every score must be finite")
    return scores.clamp(0.0, 1.0).clamp_min(floor).pow(power)


def debias_targets(
    cfg: DebiasConfig,
    labels: Tensor,
    num_classes: int,
    attributes: Tensor | None = None,
    scores: Tensor | None = None,
) -> DebiasTargets | None:
    """What the methods take as `debias=`: None for `none`; else the weights of A_g and of A_b.

    groups: needs `attributes` (N,); inferred: needs `scores` (N,) from `train_biased_model` (1 - p_b(y|x):
    high = hard for the biased model = likely bias-conflicting). Weights live on `labels`' device.
    """
    if cfg.mode == "none":
        return None
    if cfg.mode == "groups":
        if attributes is None:
            raise ValueError("debias.mode 'groups' needs the attribute labels of the training set")
        weights = group_weights(labels, attributes.to(labels.device), num_classes)
        aligned = aligned_from_attributes(labels, attributes.to(labels.device))
    else:
        if scores is None:
            raise ValueError("debias.mode 'inferred' needs the biased model's scores (the bias_model stage)")
        _check_labels(labels, num_classes, scores, "scores")
        scores = scores.to(labels.device)
        weights = score_weights(scores, cfg.score_floor, cfg.score_power)
        aligned = score_weights(1.0 - scores.double(), cfg.score_floor, cfg.score_power)
    return DebiasTargets(
        weights=weights,
        aligned_weights=aligned if cfg.repulsion > 0 else None,
        repulsion=cfg.repulsion,
        max_shift=cfg.max_shift,
    )


# --- small training loops -------------------------------------------------------------------------------


def gce_loss(logits: Tensor, targets: Tensor, q: float) -> Tensor:
    """Generalized cross-entropy, mean over the batch: (1 - p_y ** q) / q (Zhang & Sabuncu 2018).

    Its gradient is p_y ** q times CE's, so samples the model already fits (the bias-aligned ones) get
    more of the update: the model leans on the easy bias (LfF, Nam et al. 2020, eq. 2)."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    return ((1 - torch.exp(q * log_p)) / q).mean()


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


def _train(
    net: nn.Module,
    images: Tensor,
    targets: Tensor,
    draw: Callable[[int, torch.Generator], Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    desc: str,
    progress: bool,
) -> nn.Module:
    """`steps` Adam steps on batches drawn by `draw`; the data stays on its device."""
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    bar = tqdm(range(steps), desc=desc, disable=None if progress else True, leave=False)
    for _ in bar:
        index = draw(batch_size, generator).to(images.device)
        loss = loss_fn(net(images[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    bar.close()
    net.eval()
    return net


@torch.no_grad()
def predict_logits(net: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """(N, K) eval-mode logits in batches, on `images`' device."""
    was_training = net.training
    net.eval()
    try:
        out = [net(images[start : start + batch_size]) for start in range(0, images.shape[0], batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out)


def train_biased_model(
    images: Tensor,
    labels: Tensor,
    cfg: BiasModelConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    progress: bool = True,
) -> Tensor:
    """Train a deliberately biased model with GCE on the biased training set and score every sample.

    Returns scores (N,) float32 on CPU: s_i = 1 - p_b(y_i | x_i), high for the samples the biased model
    finds hard (the likely bias-conflicting ones). No attribute labels are used. Batches are drawn
    uniformly with replacement; `cfg.steps` fixes the training cost whatever N: a biased model is wanted,
    so stopping early is a feature (a long run would fit the conflicting samples too and flatten the
    scores). `net_factory` builds the network (at `cfg.width`, by the caller).
    """
    num = images.shape[0]
    if labels.shape != (num,):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match {num} images")
    net = net_factory(generator)

    def draw(n: int, gen: torch.Generator) -> Tensor:
        return torch.randint(num, (n,), generator=gen, device=gen.device)

    labels = labels.to(images.device)
    _train(
        net,
        images,
        labels,
        draw,
        lambda logits, y: gce_loss(logits, y, cfg.gce_q),
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        generator,
        "biased model (GCE)",
        progress,
    )
    probs = predict_logits(net, images, cfg.batch_score).softmax(1)  # (N, K)
    return (1 - probs.gather(1, labels.view(-1, 1)).squeeze(1)).float().cpu()


def train_bias_classifier(
    images: Tensor,
    labels: Tensor,
    attributes: Tensor,
    num_classes: int,
    cfg: BiasClassifierConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    progress: bool = True,
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
    return _train(
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
    )


def strided_subset(num: int, limit: int) -> Tensor:
    """(min(num, limit),) indices spread evenly over 0..num-1. Not the first `limit`: attributes are
    assigned in dataset order within each class (PROTOCOL section 2), so a prefix over-represents the
    low attribute ids and would skew the reference share."""
    if limit >= num:
        return torch.arange(num)
    return torch.linspace(0, num - 1, limit).round().long()


# --- the bias-amplification diagnostic -------------------------------------------------------------------


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


__all__ = [
    "MODES",
    "BiasClassifierConfig",
    "BiasModelConfig",
    "DebiasConfig",
    "DebiasTargets",
    "aligned_from_attributes",
    "aligned_share",
    "attribute_accuracy",
    "bias_amplification",
    "debias_targets",
    "gce_loss",
    "group_weights",
    "score_weights",
    "strided_subset",
    "summarise_amplification",
    "train_bias_classifier",
    "train_biased_model",
]
