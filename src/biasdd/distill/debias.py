"""Biased dataset distillation: min_S D(S, A_g) - lambda * D(S, A_b), for every method (docs/protocol.md §9).

The study (Lu et al., 2024) ends by defining it and leaves it to future work. `debias.mode` says how each
class's real-side target is debiased, and where the groups come from:

- `none`: the plain method's target (a uniform batch).
- `groups` (attribute labels): the group-balanced mean, w_i = 1 / n_(y_i, a_i).
- `fairdd` (attribute labels): FairDD's synchronized matching, the sum over the groups in a
  group-balanced batch of the method's distance to each group.
- `inferred` (no labels): JTT-style upweighting, w_i = max(s_i, floor)^power with the bias model's score
  s_i = 1 - p_b(y_i | x_i).
- `inferred_groups`, `inferred_fairdd` (no labels): as `groups` and `fairdd`, over the bias model's
  pseudo-attributes.

Weighted targets are realised by importance sampling (the class's real batch is drawn with probability
proportional to w; `distill.sampling.WeightedClassSampler`); synchronized matching draws the same
group-balanced batch and splits it by group (`dm.synchronized_embedding_loss`,
`dc.synchronized_matching_loss`). A pseudo-attribute is the bias model's confident prediction
(`biasdd.pipeline.bias_model.pseudo_attributes`): where it finds no confident bias group, every sample
keeps its class as pseudo-attribute and every inferred mode, `inferred` too, runs the plain method.

`A_b`, the bias-aligned target of the repulsion (lambda = `repulsion` > 0; the reweighting modes only),
comes from a second real batch drawn from the aligned weights and enters through a bounded term (DM: a
capped squared distance; DC/DSA: the cosine gradient distance), see `dm.debiased_embedding_loss`,
`dc.debiased_matching_loss`. `none` is the plain methods' code path (byte-identical outputs), and so is
any mode whose weights are uniform within every class and whose groups are one per class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from biasdd.config import Config, NonNegativeFloat, PositiveFloat, Range
from biasdd.distill.sampling import DebiasTargets, weights_uniform_per_class
from biasdd.errors import ConfigError
from biasdd.vocab import DEBIAS_MODES, SYNCHRONIZED_MODES

logger = logging.getLogger(__name__)

MODES = DEBIAS_MODES
LABELLED = ("groups", "fairdd")  # need the attribute labels
SCORED = ("inferred",)  # need the bias model's scores
PSEUDO = ("inferred_groups", "inferred_fairdd")  # need the bias model's pseudo-attributes
SYNCHRONIZED = SYNCHRONIZED_MODES  # FairDD's synchronized matching over the groups
REPELLING = ("groups", "inferred", "inferred_groups")  # the modes a repulsion can join


@dataclass(frozen=True)
class DebiasConfig(Config):
    """The `debias` params section: orthogonal to the method (dc, dsa, dm)."""

    SECTION: ClassVar[str] = "debias"

    mode: Literal[DEBIAS_MODES]  # type: ignore[valid-type]  # none = the study's plain methods
    repulsion: NonNegativeFloat  # lambda of the second term; 0 = reweighting only
    max_shift: PositiveFloat  # DM: repulsion stops once |mu_S - mu_b| >= (1 + max_shift) |mu_g - mu_b|
    score_floor: Annotated[float, Range(gt=0, le=1)]  # inferred: scores below are raised to it
    score_power: PositiveFloat  # inferred: w = max(s, floor) ** power; > 1 sharpens toward the hard samples

    def check(self, where: str) -> None:
        if self.repulsion > 0 and self.mode not in REPELLING:
            raise ConfigError(
                f"{where}.repulsion: {self.repulsion!r} needs {where}.mode one of {list(REPELLING)} (the "
                f"bias-aligned samples come from attribute labels or the biased model); mode is {self.mode!r}"
            )

    @property
    def uses_bias_model(self) -> bool:
        return self.mode in SCORED or self.mode in PSEUDO


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


def conflicting_groups(labels: Tensor, groups: Tensor, num_classes: int) -> int:
    """How many (class, group) pairs with group != class hold samples: 0 means no bias-conflicting group,
    so every debiasing mode reduces to the plain method."""
    pairs = labels.long() * num_classes + groups.long()
    return int(torch.unique(pairs[groups != labels]).numel())


def debias_targets(
    cfg: DebiasConfig,
    labels: Tensor,
    num_classes: int,
    attributes: Tensor | None = None,
    scores: Tensor | None = None,
    pseudo_attributes: Tensor | None = None,
) -> DebiasTargets | None:
    """What the methods take as `debias=`: None for `none`; else the weights and groups of A_g (and the
    weights of A_b with a repulsion).

    `groups`/`fairdd` need `attributes` (N,); `inferred` needs `scores` (N,) (1 - p_b(y|x): high = hard
    for the biased model = likely bias-conflicting); `inferred_groups`/`inferred_fairdd` need
    `pseudo_attributes` (N,), and so does `inferred` where it is given. Weights and groups live on
    `labels`' device. A training set without any bias-conflicting group (rho = 1, or no confident
    pseudo-group: the bias model found no bias) runs the plain method, with one warning; so does
    `inferred` then, since upweighting the samples a model without a bias gets wrong only upweights the
    hard ones (docs/protocol.md §9).
    """
    if cfg.mode == "none":
        return None
    device = labels.device
    if cfg.mode in LABELLED or cfg.mode in PSEUDO:
        source = attributes if cfg.mode in LABELLED else pseudo_attributes
        if source is None:
            what = (
                "the attribute labels of the training set"
                if cfg.mode in LABELLED
                else "the bias model's pseudo-attributes (the bias_model stage)"
            )
            raise ValueError(f"debias.mode {cfg.mode!r} needs {what}")
        groups = source.to(device).long()
        weights = group_weights(labels, groups, num_classes)
        if conflicting_groups(labels, groups, num_classes) == 0:
            # one group per class: the group weights are uniform and synchronized matching is the plain loss
            which = "the attribute labels" if cfg.mode in LABELLED else "the bias model's pseudo-attributes"
            why = f"{which} hold no bias-conflicting group (every sample has its class's own attribute)"
            return _plain(cfg.mode, why, weights)
        aligned = aligned_from_attributes(labels, groups)
    else:
        if scores is None:
            raise ValueError("debias.mode 'inferred' needs the biased model's scores (the bias_model stage)")
        _check_labels(labels, num_classes, scores, "scores")
        groups = None
        if pseudo_attributes is not None:
            _check_labels(labels, num_classes, pseudo_attributes, "pseudo_attributes")
            if conflicting_groups(labels, pseudo_attributes.to(device), num_classes) == 0:
                why = "the bias model keeps no bias-conflicting pseudo-group (it found no confident bias)"
                return _plain(cfg.mode, why, torch.ones(labels.shape, dtype=torch.float64, device=device))
        scores = scores.to(device)
        weights = score_weights(scores, cfg.score_floor, cfg.score_power)
        aligned = score_weights(1.0 - scores.double(), cfg.score_floor, cfg.score_power)
        if weights_uniform_per_class(weights, labels, num_classes):
            why = (
                "the bias model's scores are below debias.score_floor for every sample (it fits them all: "
                "no bias-conflicting sample found)"
            )
            return _plain(cfg.mode, why, weights)
    return DebiasTargets(
        weights=weights,
        aligned_weights=aligned if cfg.repulsion > 0 else None,
        repulsion=cfg.repulsion,
        max_shift=cfg.max_shift,
        groups=groups if cfg.mode in SYNCHRONIZED else None,  # None: one group per class
    )


def _plain(mode: str, why: str, weights: Tensor) -> DebiasTargets:
    """Targets that run the plain method (weights uniform within every class, one group per class, no
    repulsion), after one warning line saying why."""
    logger.warning("debias.mode %s: %s; the mode runs the plain method", mode, why)
    return DebiasTargets(weights=weights)


__all__ = [
    "MODES",
    "DebiasConfig",
    "DebiasTargets",
    "aligned_from_attributes",
    "conflicting_groups",
    "debias_targets",
    "group_weights",
    "score_weights",
]
