"""Bias injection: attribute assignment (docs/protocol.md §2), CMNIST-DD colouring (§3) and
CCIFAR10-DD corruptions (§4).

Randomness is drawn per fixed-size chunk of images from `SeedSequence(seed, spawn_key=(split, chunk))`,
so the output depends on the seed and the data only, never on the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from biasdd.config import Config, NonNegativeInt, UnitInterval, check_value, from_dict, section
from biasdd.errors import ConfigError
from biasdd.vocab import NUM_CLASSES, SPLIT_RATIO, SPLITS, Dataset

log = logging.getLogger(__name__)

CHUNK = 512  # images per random stream; fixed so that output does not depend on the worker count
# rho of each split (docs/protocol.md §2): the study's unbiased test set is rho = 0 (all conflicting);
# `test_uniform` (rho = 1/K) is the debiasing literature's convention.
SPLIT_STREAM = {"train": 0, "test_conflicting": 1, "test_uniform": 2}


@dataclass(frozen=True)
class BiasConfig(Config):
    """The top-level params that define a biased dataset."""

    dataset: Dataset
    bias_ratio: UnitInterval  # rho
    severity: Literal[1, 2, 3, 4]
    seed: NonNegativeInt
    corruption_protocol: Literal["cifar10c", "imagenet-c"]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BiasConfig:
        keys = tuple(f.name for f in dataclasses.fields(cls))
        return from_dict(cls, {k: section(params, k) for k in keys}, "")


@dataclass(frozen=True)
class CMNISTConfig(Config):
    """CMNIST-DD colours and noise (docs/protocol.md §3; LfF's colored MNIST); the `cmnist` section."""

    SECTION: ClassVar[str] = "cmnist"

    colours: tuple[tuple[float, float, float], ...]  # mean RGB in [0, 1]; attribute k = class k's colour
    sigma: tuple[float, ...]  # colour noise std at severity 1..4

    def check(self, where: str) -> None:
        if len(self.colours) != NUM_CLASSES or len(self.sigma) != 4:
            raise ConfigError(
                f"{where}: expected {NUM_CLASSES} colours and 4 sigmas, got {len(self.colours)} and "
                f"{len(self.sigma)}"
            )


# --- attribute assignment -------------------------------------------------------------------------


def attribute_milestones(n: int, bias_ratio: float, label: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """m_a = round(n * cumsum_a P[y, a]) with P[y, y] = rho, else (1 - rho) / (K - 1); round-half-even."""
    probs = np.full(num_classes, (1.0 - bias_ratio) / (num_classes - 1))
    probs[label] = bias_ratio
    return np.round(n * np.cumsum(probs)).astype(np.int64)


def assign_attributes(labels: np.ndarray, bias_ratio: float, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The bias attribute of every sample (docs/protocol.md §2, exact and RNG-free).

    Within class y, in dataset order, the j-th sample gets a = min{a : m_a > j}.
    """
    check_value("bias_ratio", bias_ratio, UnitInterval)
    attributes = np.empty(len(labels), dtype=np.int64)
    for label in range(num_classes):
        index = np.flatnonzero(labels == label)
        milestones = attribute_milestones(len(index), bias_ratio, label, num_classes)
        positions = np.arange(len(index))
        # min{a : m_a > j} == number of milestones <= j
        attributes[index] = np.searchsorted(milestones, positions, side="right")
    # cumsum can end a hair below 1.0 in floating point; the protocol gives every sample an attribute
    np.minimum(attributes, num_classes - 1, out=attributes)
    return attributes


# --- CMNIST-DD ------------------------------------------------------------------------------------


def colour_chunk(
    raw: np.ndarray, attributes: np.ndarray, colours: np.ndarray, sigma: float, seed_seq
) -> np.ndarray:
    """(n, 28, 28) uint8 digits -> (n, 3, 28, 28) uint8, one Gaussian colour offset per image."""
    rng = np.random.default_rng(seed_seq)
    colour = colours[attributes] + rng.normal(0.0, sigma, size=(len(raw), 3))  # (n, 3)
    colour = np.clip(colour, 0.0, 1.0).astype(np.float32)
    # float32 multiply then truncate, as the reference's torch code: the background (0) stays black
    coloured = colour[:, :, None, None] * raw[:, None, :, :].astype(np.float32)
    return np.floor(coloured).astype(np.uint8)


def _colour_job(args) -> np.ndarray:
    raw, attributes, colours, sigma, seed_seq = args
    return colour_chunk(raw, attributes, colours, sigma, seed_seq)


def _corrupt_job(args) -> np.ndarray:
    from biasdd.pipeline.corruptions import corrupt

    images, attributes, severity, protocol, seed_seq = args
    rng = np.random.default_rng(seed_seq)
    out = np.empty((len(images), 3, 32, 32), dtype=np.uint8)
    for i in range(len(images)):
        out[i] = corrupt(images[i], int(attributes[i]), severity, protocol, rng).transpose(2, 0, 1)
    return out


def _run_chunks(job: Callable, tasks: list, workers: int, desc: str) -> list[np.ndarray]:
    if workers <= 1 or len(tasks) <= 1:
        return [job(t) for t in tqdm(tasks, desc=desc, disable=None)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(job, tasks), total=len(tasks), desc=desc, disable=None))


def default_workers() -> int:
    """All CPU cores, or `BIASDD_WORKERS` when set (the output does not depend on it)."""
    env = os.environ.get("BIASDD_WORKERS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def inject(
    images: np.ndarray,
    attributes: np.ndarray,
    cfg: BiasConfig,
    split: str,
    cmnist: CMNISTConfig | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Apply each sample's bias attribute: a colour (CMNIST-DD) or a corruption (CCIFAR10-DD).

    Returns (N, 3, H, W) uint8. Chunk `k` of split `split` draws from SeedSequence(seed, (stream, k)).
    """
    n = len(images)
    starts = range(0, n, CHUNK)
    seeds = [np.random.SeedSequence(cfg.seed, spawn_key=(SPLIT_STREAM[split], k)) for k in range(len(starts))]
    if cfg.dataset == "cmnist":
        if cmnist is None:
            raise ValueError("cmnist: colours and sigmas are required for dataset 'cmnist'")
        colours = np.asarray(cmnist.colours, dtype=np.float64)
        sigma = cmnist.sigma[cfg.severity - 1]
        tasks = [
            (images[s : s + CHUNK], attributes[s : s + CHUNK], colours, sigma, q)
            for s, q in zip(starts, seeds, strict=True)
        ]
        parts = _run_chunks(_colour_job, tasks, workers, f"colour {split}")
    else:
        tasks = [
            (images[s : s + CHUNK], attributes[s : s + CHUNK], cfg.severity, cfg.corruption_protocol, q)
            for s, q in zip(starts, seeds, strict=True)
        ]
        parts = _run_chunks(_corrupt_job, tasks, workers, f"corrupt {split}")
    if not parts:
        h, w = images.shape[1:3]
        return np.empty((0, 3, h, w), dtype=np.uint8)
    return np.concatenate(parts)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of (N, C, H, W) uint8 images scaled to [0, 1] (float64, exact order)."""
    n, c = images.shape[:2]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for s in range(0, n, 4096):  # bounded memory, fixed summation order
        block = images[s : s + 4096].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        total_sq += (block**2).sum(axis=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean, std


def build_biased(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    cfg: BiasConfig,
    cmnist: CMNISTConfig | None = None,
    workers: int = 1,
) -> dict[str, dict[str, np.ndarray]]:
    """All three splits: {split: {images (N,3,H,W) uint8, labels, attributes, aligned}} (+ train mean/std)."""
    splits: dict[str, dict[str, np.ndarray]] = {}
    sources = {
        "train": (train_images, train_labels, cfg.bias_ratio),
        "test_conflicting": (test_images, test_labels, SPLIT_RATIO["test_conflicting"]),
        "test_uniform": (test_images, test_labels, SPLIT_RATIO["test_uniform"]),
    }
    for split in SPLITS:
        images, labels, ratio = sources[split]
        labels = labels.astype(np.int64)
        attributes = assign_attributes(labels, ratio)
        biased = inject(images, attributes, cfg, split, cmnist=cmnist, workers=workers)
        splits[split] = {
            "images": biased,
            "labels": labels,
            "attributes": attributes,
            "aligned": attributes == labels,
            "@attrs": {"bias_ratio": ratio, "n": len(labels)},
        }
        log.info(
            "%s: %d images, aligned fraction %.4f", split, len(labels), float(np.mean(attributes == labels))
        )
    mean, std = channel_stats(splits["train"]["images"])
    splits["train"]["mean"] = mean
    splits["train"]["std"] = std
    return splits
