"""Dataset Condensation with Differentiable Siamese Augmentation (DSA; Zhao & Bilen 2021).

DC's loop (`dc.run_gradient_matching`) with augmentation: in each matching step one `dsa_augment` call
over every class's real and synthetic images, with the class as group id (one parameter set per class,
shared by its real and synthetic images); per-sample augmentation in the network updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from biasdd.augment import DSAConfig
from biasdd.distill import common
from biasdd.distill.dc import GradientMatchingConfig, run_gradient_matching


@dataclass(frozen=True)
class DSAMethodConfig(GradientMatchingConfig):
    """DSA's distillation settings: the same fields as DC (init "real" in the paper)."""

    def _where(self) -> str:
        return "distill.dsa"


def distill(
    real_images: Tensor,
    real_labels: Tensor,
    num_classes: int,
    cfg: DSAMethodConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    dsa: DSAConfig | None = None,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    debias: common.DebiasTargets | None = None,
) -> common.DistillResult:
    """Distil with DSA; `dsa` (the augmentation parameters) is required. `debias`: debiased real-side
    targets (None = plain DSA)."""
    if dsa is None:
        raise ValueError("dsa: the DSA method needs a DSAConfig (the `dsa` params section)")
    return run_gradient_matching(
        real_images,
        real_labels,
        num_classes,
        cfg,
        net_factory,
        generator,
        dsa,
        resume,
        on_checkpoint,
        checkpoint_every,
        progress,
        desc="dsa",
        debias=debias,
    )
