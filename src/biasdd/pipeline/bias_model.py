"""The deliberately biased model behind `debias.mode: inferred` (the `bias_model` stage; docs/protocol.md §9).

A narrow network trained for a few Adam steps with generalized cross-entropy (GCE, q = 0.7; Zhang &
Sabuncu 2018, as LfF, Nam et al. 2020) leans on the easy bias; its score of every training sample,
s_i = 1 - p_b(y_i | x_i), is high for the samples it finds hard (the likely bias-conflicting ones). No
attribute labels are used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
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
    probs = predict_logits(net, images, cfg.batch_score, compute).softmax(1)  # (N, K)
    return (1 - probs.gather(1, labels.view(-1, 1)).squeeze(1)).float().cpu()


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


def run(setup: BiasModelSetup, data_path: Path, progress: bool = True) -> dict:
    """The GCE-biased model's score of every training sample: {"train": {"scores": (N,) float32}}."""
    setup = dataclasses.replace(setup, run=start(setup.run))  # the device: leased now, not when validated
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    images = train.images.to(setup.run.device)
    generator = torch.Generator().manual_seed(derive_seed(setup.run.seed, "bias_model"))
    factory = net_factory(setup.run, images.shape[1], images.shape[-1], width=setup.model.width)
    scores = train_biased_model(
        images, train.labels, setup.model, factory, generator, progress, setup.run.compute
    )
    conflicting = train.attributes != train.labels  # only logged: the scores never see attributes
    if bool(conflicting.any()) and bool((~conflicting).any()):
        log.info(
            "biased model: mean score %.3f on bias-aligned, %.3f on bias-conflicting samples",
            float(scores[~conflicting].mean()),
            float(scores[conflicting].mean()),
        )
    return {"train": {"scores": scores.numpy().astype(np.float32)}}
