"""Biased dataset distillation: min_S D(S, A_g) - lambda * D(S, A_b), for every method (docs/protocol.md §9).

The study (Lu et al., 2024) ends by defining it and leaves it to future work. Here:

- `A_g`, the unbiased target, is each class's real-side target (DM: mean embedding; DC/DSA: gradient of
  the mean CE) taken under per-sample weights that undo the bias:
  - `groups` (attribute labels): w_i = 1 / n_(y_i, a_i), so every (class, attribute) group of a class
    weighs the same (group-balanced matching);
  - `inferred` (no attribute labels): the `bias_model` stage's deliberately biased model scores every
    training sample by s_i = 1 - p_b(y_i | x_i); w_i = max(s_i, floor)^power, so the samples it finds
    hard (the likely bias-conflicting ones) dominate (JTT-style upweighting, Liu et al. 2021).
  The methods draw the real batch with probability proportional to w (importance sampling; see
  `distill.sampling.WeightedClassSampler`), which estimates the weighted target with little variance.
- `A_b`, the bias-aligned target, comes from a second real batch drawn from the aligned weights
  (labelled: attribute == label; inferred: max(1 - s_i, floor)^power), and lambda (`repulsion`) pushes
  the synthetic set away from it through a bounded term (DM: a capped squared distance; DC/DSA: the
  cosine gradient distance, bounded per row), see `dm.debiased_embedding_loss`, `dc.debiased_matching_loss`.
- `none` is the plain methods' code path (the methods get `debias=None`), byte-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from biasdd.config import Config, NonNegativeFloat, PositiveFloat, Range
from biasdd.distill.sampling import DebiasTargets
from biasdd.errors import ConfigError

logger = logging.getLogger(__name__)

MODES = ("none", "groups", "inferred")


@dataclass(frozen=True)
class DebiasConfig(Config):
    """The `debias` params section: orthogonal to the method (dc, dsa, dm)."""

    SECTION: ClassVar[str] = "debias"

    mode: Literal["none", "groups", "inferred"]  # none = the study's plain methods
    repulsion: NonNegativeFloat  # lambda of the second term; 0 = reweighting only
    max_shift: PositiveFloat  # DM: repulsion stops once |mu_S - mu_b| >= (1 + max_shift) |mu_g - mu_b|
    score_floor: Annotated[float, Range(gt=0, le=1)]  # inferred: scores below are raised to it
    score_power: PositiveFloat  # inferred: w = max(s, floor) ** power; > 1 sharpens toward the hard samples

    def check(self, where: str) -> None:
        if self.mode == "none" and self.repulsion > 0:
            raise ConfigError(
                f"{where}.repulsion: {self.repulsion!r} needs {where}.mode 'groups' or 'inferred' (the "
                "bias-aligned samples come from attribute labels or the biased model); mode is 'none'"
            )


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


__all__ = [
    "MODES",
    "DebiasConfig",
    "DebiasTargets",
    "aligned_from_attributes",
    "debias_targets",
    "group_weights",
    "score_weights",
]
