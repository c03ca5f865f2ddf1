"""The deliberately biased model behind the label-free debiasing modes (the `bias_model` stage;
docs/protocol.md §9).

A narrow network trained for a few Adam steps with generalized cross-entropy (GCE, q = 0.7; Zhang &
Sabuncu 2018, as LfF, Nam et al. 2020) leans on the easy bias. Of every training sample it gives:

- its score s_i = 1 - p_b(y_i | x_i), high for the samples it finds hard (the likely bias-conflicting
  ones), for `debias.mode: inferred`;
- its pseudo-attribute, for `inferred_groups` and `inferred_fairdd`: the class the model predicts where
  that is another class than the label and the model's mistakes are confident: a biased model predicts
  a bias-conflicting sample's bias attribute (at rho 0.95 on CMNIST-DD its prediction equals the colour
  for 99% of the training set), with the confidence the bias gives it. Where its mistakes are
  unconfident (the model learnt the class rather than a bias: on CMNIST-DD at rho 0.1 and 0, and at rho
  0.5, where the bias it learnt is too weak to tell), no group is kept and the modes run the plain
  method. `bias_model.grouping` says how: `per_group` keeps each (class, predicted class) group that is
  confident on its own (`pseudo_attributes`); `clustered` asks once whether the mistakes are confident
  on the whole, then keeps every group and refines it by the model's log-probabilities
  (`clustered_pseudo_attributes`).

Training and inference never see the attribute labels; `inference_metrics` compares the inference with
them afterwards (a DVC metric), so that a user sees why a label-free mode works or fails.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor, nn

from biasdd.config import Config, PositiveFloat, PositiveInt, Range, from_dict, section
from biasdd.training.compute import FP32, ComputeConfig
from biasdd.training.data import load_split, train_stats
from biasdd.training.runtime import RunConfig, derive_seed, net_factory, run_config, start
from biasdd.training.trainer import predict_logits, train_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BiasModelConfig(Config):
    """The `bias_model` params section."""

    SECTION: ClassVar[str] = "bias_model"

    gce_q: Annotated[float, Range(gt=0, le=1)]  # GCE q (0.7: Zhang & Sabuncu 2018; LfF, Nam et al. 2020)
    steps: PositiveInt  # Adam steps; few on purpose: a long run memorises the conflicting samples too
    batch_size: PositiveInt
    lr: PositiveFloat  # Adam learning rate (1e-3, LfF)
    width: PositiveInt  # network width (the `model.net` architecture); narrow = cheaper and more biased
    batch_score: PositiveInt  # scoring batch (no gradients)
    grouping: Literal["per_group", "clustered"]  # how pseudo-groups are kept (docs/protocol.md §9)
    # the least mean confidence of the model's mistakes that counts as a bias: per pseudo-group
    # (per_group) or over all of them (clustered)
    confidence: Annotated[float, Range(gt=0, le=1)]
    min_group: PositiveInt  # a pseudo-group's least size


def gce_loss(logits: Tensor, targets: Tensor, q: float) -> Tensor:
    """Generalized cross-entropy, mean over the batch: (1 - p_y ** q) / q (Zhang & Sabuncu 2018).

    Its gradient is p_y ** q times CE's, so samples the model already fits (the bias-aligned ones) get
    more of the update: the model leans on the easy bias (LfF, Nam et al. 2020, eq. 2)."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    return ((1 - torch.exp(q * log_p)) / q).mean()


def train_biased_model(
    images: Tensor,
    labels: Tensor,
    cfg: BiasModelConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    progress: bool = True,
    compute: ComputeConfig = FP32,
) -> Tensor:
    """Train a deliberately biased model with GCE on the biased training set; its probabilities of
    every sample, (N, K) float32 on CPU. No attribute labels are used. Batches are drawn
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
    train_steps(
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
        compute,
    )
    return predict_logits(net, images, cfg.batch_score, compute).softmax(1).float().cpu()  # (N, K)


def bias_scores(probs: Tensor, labels: Tensor) -> Tensor:
    """(N,) float32: s_i = 1 - p_b(y_i | x_i), high for the samples the biased model finds hard."""
    return (1 - probs.gather(1, labels.view(-1, 1).to(probs.device)).squeeze(1)).float()


def pseudo_attributes(probs: Tensor, labels: Tensor, confidence: float, min_group: int) -> Tensor:
    """(N,) int64: each sample's pseudo-attribute, the class the biased model predicts for it where that
    forms a confident pseudo-group, else its label.

    A pseudo-group is the samples of class c the model predicts as another class a. It is kept when the
    model's mean confidence over them is at least `confidence` and it holds at least `min_group`
    samples: a bias-conflicting sample is predicted as its bias attribute's class with the confidence of
    the bias (on CMNIST-DD at rho 0.95, 60 of the 90 groups have a mean confidence >= 0.7), while the
    mistakes of a model that learnt the class are unconfident (at rho 0.5, 0.1 and 0 no group reaches 0.7).
    """
    num_classes = probs.shape[1]
    labels = labels.to(probs.device).long()
    top, predicted = probs.max(1)
    pairs = labels * num_classes + predicted  # (N,) the (class, predicted class) group of each sample
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    mean_top = torch.bincount(pairs, weights=top.double(), minlength=num_classes * num_classes)
    mean_top = mean_top / counts.clamp_min(1)
    kept = (counts >= min_group) & (mean_top >= confidence)  # (K * K,)
    return torch.where((predicted != labels) & kept[pairs], predicted, labels)


def clustered_pseudo_attributes(
    probs: Tensor, labels: Tensor, confidence: float, min_group: int, iterations: int = 20
) -> Tensor:
    """(N,) int64: each sample's pseudo-attribute, with every group of the biased model's mistakes kept
    and refined, once its mistakes are confident on the whole; else every sample's label.

    The test is global: the mean top-class probability over every sample the model gets wrong must reach
    `confidence` (on CMNIST-DD at the quick budget: 0.82 at rho 0.95, 0.67 at 0.8; 0.47-0.49 at rho 0.5,
    0.1 and 0). Then, in each class, the samples predicted as another class are clustered by k-means
    on their log-probabilities, seeded by that prediction (each seed keeps its predicted class as
    pseudo-attribute): a biased model's prediction mixes similar attributes sample by sample, while its
    log-probabilities keep them apart (the seeds' mixtures move to the cluster their attribute forms).
    Clusters under `min_group` samples go back to the class's own group; the samples the model predicts
    as their class stay there (k-means over the class's own group would draw bias-aligned samples of
    unusual shape into the small groups)."""
    num_classes = probs.shape[1]
    labels = labels.to(probs.device).long()
    top, predicted = probs.max(1)
    wrong = predicted != labels
    if not bool(wrong.any()) or float(top[wrong].double().mean()) < confidence:
        return labels.clone()
    points = probs.clamp_min(1e-6).log()  # (N, K)
    pseudo = labels.clone()
    for c in range(num_classes):
        index = torch.nonzero((labels == c) & wrong).squeeze(1)
        if index.numel() == 0:
            continue
        x, group = points[index], predicted[index]
        for _ in range(iterations):
            ids = torch.unique(group)
            centres = torch.stack([x[group == a].mean(0) for a in ids])  # (G, K)
            moved = ids[torch.cdist(x, centres).argmin(1)]
            if torch.equal(moved, group):
                break
            group = moved
        sizes = torch.bincount(group, minlength=num_classes)
        pseudo[index] = torch.where(sizes[group] >= min_group, group, c)
    return pseudo


def assign_pseudo_attributes(probs: Tensor, labels: Tensor, cfg: BiasModelConfig) -> Tensor:
    """The pseudo-attributes by `cfg.grouping`."""
    rule = clustered_pseudo_attributes if cfg.grouping == "clustered" else pseudo_attributes
    return rule(probs, labels, cfg.confidence, cfg.min_group)


def auc(positive: Tensor, negative: Tensor) -> float | None:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U over average ranks);
    None when a side is empty."""
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    ranks = rankdata(torch.cat([positive, negative]).double().numpy())  # average ranks of ties
    u = ranks[: positive.numel()].sum() - positive.numel() * (positive.numel() + 1) / 2
    return float(u / (positive.numel() * negative.numel()))


def inference_metrics(
    scores: Tensor, pseudo: Tensor, labels: Tensor, attributes: Tensor
) -> dict[str, float | int | None]:
    """How well the bias model infers what the label-free modes need, against the true attributes
    (measured after the fact; never an input). None where a quantity has no sample to be measured on.

    conflicting_precision / _recall: of the samples it gives another pseudo-attribute than their class,
    the share that is bias-conflicting, and of the bias-conflicting samples the share it finds;
    attribute_accuracy: the share of those it finds whose pseudo-attribute is their attribute;
    groups_found / groups_true: (class, attribute) groups other than the class's own, inferred and true;
    score_auc: how well the scores of `inferred` rank bias-conflicting above bias-aligned samples."""
    labels, attributes, pseudo = labels.long(), attributes.long(), pseudo.long()
    conflicting, flagged = attributes != labels, pseudo != labels
    num_classes = int(max(int(labels.max()), int(attributes.max()), int(pseudo.max()))) + 1

    def share(part: Tensor, whole: Tensor) -> float | None:
        return float(part.sum() / whole.sum()) if bool(whole.any()) else None

    def groups(values: Tensor) -> int:
        pairs = labels * num_classes + values
        return int(torch.unique(pairs[values != labels]).numel())

    return {
        "conflicting_precision": share(flagged & conflicting, flagged),
        "conflicting_recall": share(flagged & conflicting, conflicting),
        "attribute_accuracy": share(flagged & (pseudo == attributes), flagged),
        "groups_found": groups(pseudo),
        "groups_true": groups(attributes),
        "score_auc": auc(scores[conflicting], scores[~conflicting]),
    }


# --- the stage --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BiasModelSetup:
    run: RunConfig
    model: BiasModelConfig

    def provenance(self) -> dict[str, Any]:
        return {**self.run.provenance(), "config": dataclasses.asdict(self.model)}


def configure(params: Mapping[str, Any]) -> BiasModelSetup:
    """Validate every param the bias_model stage uses."""
    return BiasModelSetup(
        run_config(params), from_dict(BiasModelConfig, section(params, "bias_model"), "bias_model")
    )


def run(setup: BiasModelSetup, data_path: Path, progress: bool = True) -> tuple[dict, dict]:
    """The GCE-biased model's score and pseudo-attribute of every training sample, as the groups of
    `data/bias_model.h5` ({"train": {"scores", "pseudo_attributes"}}), and its `inference_metrics`."""
    setup = dataclasses.replace(setup, run=start(setup.run))  # the device: leased now, not when validated
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    images = train.images.to(setup.run.device)
    generator = torch.Generator().manual_seed(derive_seed(setup.run.seed, "bias_model"))
    factory = net_factory(setup.run, images.shape[1], images.shape[-1], width=setup.model.width)
    probs = train_biased_model(
        images, train.labels, setup.model, factory, generator, progress, setup.run.compute
    )
    scores = bias_scores(probs, train.labels)
    pseudo = assign_pseudo_attributes(probs, train.labels, setup.model)
    metrics = inference_metrics(scores, pseudo, train.labels, train.attributes)  # attributes: only here
    log.info(
        "bias model: %s",
        ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
    )
    groups = {"train": {"scores": scores.numpy().astype(np.float32), "pseudo_attributes": pseudo.numpy()}}
    return groups, metrics


# the DVC metric of the inference (few keys, so that `dvc metrics show` fits a terminal); the rest goes
# to the details file
INFERENCE_HEADLINE = {
    "precision": "conflicting_precision",
    "recall": "conflicting_recall",
    "groups": "groups_found",
}


def inference_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {key: metrics[name] for key, name in INFERENCE_HEADLINE.items()}
