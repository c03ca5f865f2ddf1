"""Reading the biased dataset for training: normalised tensors of a split, and the normalisation.

Images are distilled and trained on in normalised space: (x / 255 - mean) / std per channel, with the
mean and std of the biased training split, computed by bias_inject (docs/protocol.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from biasdd import artifacts
from biasdd.vocab import NUM_CLASSES, TEST_SPLITS  # noqa: F401 (re-exported for the training stages)


@dataclass
class BiasedSplit:
    images: Tensor  # (N, C, H, W) float32, normalised
    labels: Tensor  # (N,) int64
    attributes: Tensor  # (N,) int64


def normalise(images_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Tensor:
    """(N, C, H, W) uint8 -> float32 (x / 255 - mean) / std, per channel."""
    x = torch.from_numpy(images_uint8).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def train_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (mean, std) of the biased training split, in [0, 1] units."""
    stats = artifacts.read_h5(path, "train", ("mean", "std"), kind="biased")
    return stats["mean"], stats["std"]


def load_split(
    path: Path, split: str, mean: np.ndarray, std: np.ndarray, limit: int | None = None
) -> BiasedSplit:
    """A split of `biased.h5` as normalised tensors (the first `limit` images, or all)."""
    data = artifacts.read_h5(path, split, ("images", "labels", "attributes"), kind="biased")
    n = len(data["labels"]) if limit is None else min(limit, len(data["labels"]))
    return BiasedSplit(
        normalise(data["images"][:n], mean, std),
        torch.from_numpy(data["labels"][:n].astype(np.int64)),
        torch.from_numpy(data["attributes"][:n].astype(np.int64)),
    )
