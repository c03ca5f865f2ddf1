"""biasdd.figures: what Figure 1 shows."""

from __future__ import annotations

import numpy as np

from biasdd.figures import conflicting_picks, sample_grid
from biasdd.pipeline.bias_inject import assign_attributes


def test_figure1_conflicting_row_shows_different_attributes(tmp_path):
    # MNIST-like class sizes in dataset order, bias ratio 0.95: the first conflicting sample of every
    # class carries attribute 0 (class 0: attribute 1), so a first-found row would look one-coloured
    labels = np.repeat(np.arange(10), 600)
    attributes = assign_attributes(labels, 0.95)
    first = [int(attributes[np.flatnonzero((labels == c) & (attributes != c))[0]]) for c in range(10)]
    assert len(set(first)) <= 2
    picks = conflicting_picks(labels, attributes, 10)
    shown = [int(attributes[p]) for p in picks]
    assert len(set(shown)) == 10  # ten different attributes in ten columns
    assert all(labels[p] == c and attributes[p] != c for c, p in enumerate(picks))
    # a class without conflicting samples (bias ratio 1) leaves its cell empty
    assert conflicting_picks(labels, labels.copy(), 10) == [None] * 10
    images = np.zeros((len(labels), 3, 4, 4), dtype=np.uint8)
    sample_grid(images, labels, attributes, 1, tmp_path / "f.png", "t")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
