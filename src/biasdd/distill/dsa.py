"""Dataset Condensation with Differentiable Siamese Augmentation (DSA; Zhao & Bilen 2021).

DC's matcher (`dc.GradientMatching`) with augmentation: the driver augments each step's real and
synthetic images with one siamese `dsa_augment` call (the class as group id: one parameter set per
class, shared by its real and synthetic images), and the network trains on the synthetic set with
per-sample augmentation (docs/protocol.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from biasdd.distill.dc import GradientMatching, GradientMatchingConfig
from biasdd.distill.driver import Context


@dataclass(frozen=True)
class DSAMethodConfig(GradientMatchingConfig):
    """DSA's distillation settings: the same fields as DC (init "real" in the paper)."""

    SECTION: ClassVar[str] = "distill.dsa"


def matcher(cfg: DSAMethodConfig, context: Context) -> GradientMatching:
    """DC's matcher; DSA needs the augmentation parameters."""
    if context.dsa is None:
        raise ValueError("dsa: the DSA method needs a DSAConfig (the `augment.dsa` params section)")
    return GradientMatching(cfg, context)
