"""The study's figures as PNGs, and the CSV series `dvc plots` compares (the only matplotlib importer).

- Figure 1: a sample grid of the biased training set, one column per class: a bias-conflicting row on
  top, bias-aligned rows under it.
- Figures 2-3: the synthetic images of each method, one row per class.
- Accuracy per method against the full set, mean +- std over repeats, on both test splits.
Everything renders offline (Agg backend, no web fonts or CDNs).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from biasdd.vocab import FULL, METHODS, ROW_TITLES, TABLE1_SEVERITY, TEST_SPLITS  # noqa: E402

SPLITS = TEST_SPLITS

SPLIT_TITLES = {
    "test_conflicting": "unbiased test (rho = 0, study)",
    "test_uniform": "uniform test (rho = 0.1)",
}


def _to_hwc(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C) float in [0, 1]; a single channel stays grey."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return np.clip(images.transpose(0, 2, 3, 1), 0.0, 1.0)


def _show_grid(ax_grid: np.ndarray, cells: list[list[np.ndarray | None]]) -> None:
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            ax = ax_grid[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if image is not None:
                ax.imshow(
                    image if image.shape[-1] == 3 else image[..., 0],
                    cmap=None if image.shape[-1] == 3 else "gray",
                )


def conflicting_picks(labels: np.ndarray, attributes: np.ndarray, num_classes: int) -> list[int | None]:
    """One bias-conflicting sample per class for Figure 1's top row, with a different attribute in
    each column where the data allow: class c prefers attribute (c + 1) mod K, then any attribute not
    shown yet, then any. (The first conflicting sample of every class carries attribute 0 or 1, since
    attributes are assigned in dataset order: the row would look as if every conflict were one colour.)
    """
    picks: list[int | None] = []
    used: set[int] = set()
    for c in range(num_classes):
        conflicting = np.flatnonzero((labels == c) & (attributes != labels))
        if not len(conflicting):
            picks.append(None)
            continue
        attrs = attributes[conflicting]
        preferred = (c + 1) % num_classes
        order = [preferred] + [a for a in range(num_classes) if a != preferred and a not in used]
        choice = next(
            (int(conflicting[attrs == a][0]) for a in order if np.any(attrs == a)), int(conflicting[0])
        )
        used.add(int(attributes[choice]))
        picks.append(choice)
    return picks


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    attributes: np.ndarray,
    rows_aligned: int,
    path: Path,
    title: str,
    num_classes: int = 10,
) -> None:
    """Figure 1: per class (column) one bias-conflicting sample (`conflicting_picks`), then the first
    bias-aligned ones."""
    hwc = _to_hwc(images)
    aligned = attributes == labels
    cells: list[list[np.ndarray | None]] = [[None] * num_classes for _ in range(1 + rows_aligned)]
    for c, pick in enumerate(conflicting_picks(labels, attributes, num_classes)):
        if pick is not None:
            cells[0][c] = hwc[pick]
        for r, index in enumerate(np.flatnonzero((labels == c) & aligned)[:rows_aligned]):
            cells[1 + r][c] = hwc[index]
    fig, axes = plt.subplots(
        1 + rows_aligned, num_classes, figsize=(num_classes * 0.9, (1 + rows_aligned) * 0.95), squeeze=False
    )
    _show_grid(axes, cells)
    axes[0, 0].set_ylabel("conflicting", fontsize=7)
    for r in range(rows_aligned):
        axes[1 + r, 0].set_ylabel("aligned", fontsize=7)
    for c in range(num_classes):
        axes[0, c].set_title(str(c), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def denormalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised (N, C, H, W) -> [0, 1] pixels (clipped)."""
    mean = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
    return np.clip(images * std + mean, 0.0, 1.0)


def synthetic_grid(
    images: np.ndarray,
    labels: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    per_class: int,
    path: Path,
    title: str,
    num_classes: int = 10,
) -> None:
    """Figures 2-3: one row per class, its first `per_class` synthetic images."""
    hwc = _to_hwc(denormalise(images, mean, std))
    counts = [int(np.sum(labels == c)) for c in range(num_classes)]
    columns = max(1, min(per_class, max(counts)))
    cells: list[list[np.ndarray | None]] = []
    for c in range(num_classes):
        index = np.flatnonzero(labels == c)[:columns]
        cells.append([hwc[i] for i in index] + [None] * (columns - len(index)))
    fig, axes = plt.subplots(
        num_classes, columns, figsize=(columns * 0.8 + 0.4, num_classes * 0.8 + 0.4), squeeze=False
    )
    _show_grid(axes, cells)
    for c in range(num_classes):
        axes[c, 0].set_ylabel(str(c), fontsize=7, rotation=0, labelpad=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def synthetic_by_ratio(
    sets: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    per_class: int,
    path: Path,
    title: str,
    num_classes: int = 10,
) -> None:
    """The study's Figure 2: one panel per bias ratio (`sets`: panel title -> (images, labels, mean, std)),
    one row per class, its first `per_class` synthetic images."""
    fig, axes = plt.subplots(
        num_classes,
        len(sets) * (per_class + 1) - 1,
        figsize=(len(sets) * (per_class + 1) * 0.55, num_classes * 0.55 + 0.6),
        squeeze=False,
    )
    for panel, (name, (images, labels, mean, std)) in enumerate(sets.items()):
        hwc = _to_hwc(denormalise(images, mean, std))
        first = panel * (per_class + 1)
        for c in range(num_classes):
            index = np.flatnonzero(labels == c)[:per_class]
            for j in range(per_class):
                ax = axes[c, first + j]
                ax.axis("off")
                if j < len(index):
                    ax.imshow(hwc[index[j]], interpolation="nearest")
            if panel:
                axes[c, first - 1].axis("off")  # the gap between panels
        axes[0, first + per_class // 2].set_title(name, fontsize=8)
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(title, max(40, int(width * 13))), fontsize=9)  # ~13 characters an inch at 9 pt
    fig.tight_layout()
    _save(fig, path)


def accuracy_figure(metrics: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Bars per method (mean +- std over repeats) with the full set's mean as a band, both test splits."""
    names = [n for n in metrics if n != "full"]
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(4.2 * len(SPLITS), 3.4), squeeze=False)
    for ax, split in zip(axes[0], SPLITS, strict=True):
        means = [100 * metrics[n][split]["accuracy"]["mean"] for n in names]
        stds = [100 * metrics[n][split]["accuracy"]["std"] for n in names]
        conflicting = [metrics[n][split]["conflicting_accuracy"]["mean"] for n in names]
        positions = np.arange(len(names))
        ax.bar(positions, means, yerr=stds, capsize=4, color="tab:blue", label="accuracy")
        if any(v is not None for v in conflicting):
            ax.scatter(
                positions,
                [math.nan if v is None else 100 * v for v in conflicting],
                color="tab:red",
                marker="_",
                s=300,
                label="conflicting",
                zorder=3,
            )
        if "full" in metrics:
            full = metrics["full"][split]["accuracy"]
            low, high = 100 * (full["mean"] - full["std"]), 100 * (full["mean"] + full["std"])
            ax.axhspan(low, high, color="tab:gray", alpha=0.3)
            ax.axhline(100 * full["mean"], color="black", linestyle="--", label="full set")
        ax.set_xticks(positions, [n.upper() for n in names])
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(SPLIT_TITLES[split], fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def loss_figure(curves: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(3.4 * max(1, len(curves)), 2.8), squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items(), strict=False):
        ax.plot(np.arange(len(losses)), losses)
        ax.set_title(name.upper(), fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        if len(losses) and np.all(np.asarray(losses) > 0):
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    from biasdd.artifacts import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)


def curves_figure(cells: Mapping[tuple, Any], budget: str, dataset: str, path: Path, title: str) -> None:
    """Accuracy vs bias ratio per method and the full set, error bars = std, one panel per split."""
    from biasdd.figures import _save, plt  # the Agg backend is set there

    fig, axes = plt.subplots(1, len(TEST_SPLITS), figsize=(4.6 * len(TEST_SPLITS), 3.6), squeeze=False)
    for ax, split in zip(axes[0], TEST_SPLITS, strict=True):
        for method in (*METHODS, FULL):
            points = sorted(
                (c.bias_ratio, 100 * c.mean, 100 * c.std)
                for c in cells.values()
                if (c.budget, c.dataset, c.severity, c.method, c.split, c.mode)
                == (budget, dataset, TABLE1_SEVERITY, method, split, "none")
            )
            if not points:
                continue
            x, y, err = zip(*points, strict=True)
            style = {"color": "black", "linestyle": "--"} if method == FULL else {}
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=ROW_TITLES[method], **style)
        ax.set_xlabel("bias ratio rho (share of bias-aligned training samples)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(0, 100)
        ax.set_title(SPLIT_TITLES[split], fontsize=9)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
