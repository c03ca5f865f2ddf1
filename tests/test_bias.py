from pathlib import Path

import numpy as np
import pytest

from biasdd.params import load_params
from biasdd.pipeline.bias_inject import (
    BiasConfig,
    CMNISTConfig,
    assign_attributes,
    build_biased,
    channel_stats,
    colour_chunk,
    inject,
)

REPO = Path(__file__).resolve().parents[1]

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
GRID = [0.0, 0.1, 0.5, 0.8, 0.95, 1.0]


def _labels(sizes):
    # interleave classes the way a real dataset does (assignment follows dataset order within a class)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(0).permutation(labels)


def _expected_counts(n, rho, label):
    """docs/protocol.md §2 written out per sample, independently of the implementation."""
    probs = [rho if a == label else (1 - rho) / 9 for a in range(10)]
    milestones, total = [], 0.0
    for p in probs:
        total += p
        milestones.append(int(np.round(n * total)))
    counts = [0] * 10
    for j in range(n):
        counts[next(a for a in range(10) if milestones[a] > j)] += 1
    return counts


@pytest.mark.parametrize("rho", GRID)
@pytest.mark.parametrize("sizes", [MNIST_TRAIN, MNIST_TEST], ids=["train", "test"])
def test_exact_counts_with_real_mnist_class_sizes(rho, sizes):
    labels = _labels(sizes)
    attributes = assign_attributes(labels, rho)
    for label, n in enumerate(sizes):
        counts = np.bincount(attributes[labels == label], minlength=10).tolist()
        assert counts == _expected_counts(n, rho, label)
        assert sum(counts) == n  # nobody stays clean


def test_known_values_and_edge_ratios():
    labels = _labels(MNIST_TRAIN)
    a95 = assign_attributes(labels, 0.95)
    # class 0: m_0 = round(5923 * .95) = round(5626.85) = 5627 aligned samples
    assert int(np.sum((labels == 0) & (a95 == 0))) == 5627
    assert np.all(assign_attributes(labels, 1.0) == labels)
    assert not np.any(assign_attributes(labels, 0.0) == labels)
    uniform = assign_attributes(labels, 0.1)
    for label, _n in enumerate(MNIST_TRAIN):
        counts = np.bincount(uniform[labels == label], minlength=10)
        assert counts.max() - counts.min() <= 1  # exactly uniform up to rounding


def test_assignment_follows_dataset_order():
    labels = np.zeros(10, dtype=np.int64)
    # rho = .5, n = 10: milestones 5, 6, 6, 7, 7, 8, 8, 9, 9, 10 (round-half-even at 5.5 -> 6, 6.5 -> 6...)
    attributes = assign_attributes(labels, 0.5)
    assert attributes[:5].tolist() == [0] * 5  # the first samples in order get the aligned attribute
    assert attributes.tolist() == _expand(_expected_counts(10, 0.5, 0))


def _expand(counts):
    return [a for a, c in enumerate(counts) for _ in range(c)]


def _cmnist_cfg():
    params = load_params(REPO / "params.yaml")
    from biasdd.config import from_dict

    return from_dict(CMNISTConfig, params["cmnist"], "cmnist")


@pytest.mark.parametrize("severity", [1, 2, 3, 4])
def test_colours_within_noise_bound_and_black_background(severity):
    cmnist = _cmnist_cfg()
    rng = np.random.default_rng(3)
    raw = (rng.random((300, 28, 28)) > 0.6).astype(np.uint8) * 255
    raw[:, 0, 0] = 255  # at least one full-intensity pixel per image to read the colour off
    raw[:, 27, 27] = 0
    attributes = np.arange(300) % 10
    out = colour_chunk(
        raw, attributes, np.asarray(cmnist.colours), cmnist.sigma[severity - 1], np.random.SeedSequence(0)
    )
    assert out.shape == (300, 3, 28, 28) and out.dtype == np.uint8
    background = np.broadcast_to(raw[:, None] == 0, out.shape)
    assert np.all(out[background] == 0)
    colour = out[:, :, 0, 0].astype(np.float64) / 255.0  # floor(c * 255) / 255 in [c - 1/255, c]
    means = np.asarray(cmnist.colours)[attributes]
    bound = 5 * cmnist.sigma[severity - 1] + 1 / 255
    assert np.all(np.abs(colour - means) <= bound)
    # the noise is there: one offset per image, spread about sigma
    spread = np.std(colour - means)
    assert 0.3 * cmnist.sigma[severity - 1] < spread < 2 * cmnist.sigma[severity - 1] + 1 / 255


def test_colouring_is_floor_of_float32_product():
    raw = np.array([[[0, 1, 128, 255]]], dtype=np.uint8)  # (1, 1, 4)
    colours = np.tile(np.array([[0.5, 0.25, 1.0]]), (10, 1))
    out = colour_chunk(raw, np.array([0]), colours, 0.0, np.random.SeedSequence(0))
    assert out[0, :, 0].tolist() == [[0, 0, 64, 127], [0, 0, 32, 63], [0, 1, 128, 255]]


def _cfg(**kw):
    base = dict(dataset="cmnist", bias_ratio=0.8, severity=4, seed=0, corruption_protocol="cifar10c")
    base.update(kw)
    return BiasConfig(**base)


def test_output_independent_of_workers_and_seeded():
    cmnist = _cmnist_cfg()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (1500, 28, 28), dtype=np.uint8)  # three chunks
    attributes = np.arange(1500) % 10
    one = inject(raw, attributes, _cfg(), "train", cmnist, workers=1)
    two = inject(raw, attributes, _cfg(), "train", cmnist, workers=2)
    assert np.array_equal(one, two)
    other = inject(raw, attributes, _cfg(seed=1), "train", cmnist, workers=1)
    assert not np.array_equal(one, other)
    # test splits draw their own streams
    assert not np.array_equal(one, inject(raw, attributes, _cfg(), "test_uniform", cmnist, workers=1))


def test_build_biased_splits():
    cmnist = _cmnist_cfg()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    splits = build_biased(train, np.arange(200) % 10, test, np.arange(100) % 10, _cfg(), cmnist)
    assert set(splits) == {"train", "test_conflicting", "test_uniform"}
    assert splits["train"]["aligned"].mean() == pytest.approx(0.8)
    assert splits["test_conflicting"]["aligned"].sum() == 0
    assert splits["test_uniform"]["aligned"].mean() == pytest.approx(0.1)
    for split in splits.values():
        assert split["images"].dtype == np.uint8 and split["images"].shape[1:] == (3, 28, 28)
        assert np.array_equal(split["aligned"], split["attributes"] == split["labels"])
    mean, std = channel_stats(splits["train"]["images"])
    np.testing.assert_allclose(mean, splits["train"]["images"].mean(axis=(0, 2, 3)) / 255, rtol=1e-10)
    np.testing.assert_allclose(std, (splits["train"]["images"] / 255).std(axis=(0, 2, 3)), rtol=1e-8)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"bias_ratio": 1.5}, r"bias_ratio: 1.5 is not valid; expected a number in \[0, 1\]"),
        ({"bias_ratio": -0.1}, "bias_ratio"),
        ({"severity": 5}, r"severity: 5 is not valid; choose one of \[1, 2, 3, 4\]"),
        ({"severity": 0}, "severity"),
        (
            {"dataset": "svhn"},
            r"dataset: 'svhn' is not valid; choose one of \['cmnist', 'ccifar10'\]",
        ),
        ({"corruption_protocol": "blur"}, r"corruption_protocol: 'blur' is not valid; choose one of"),
        ({"bias_ratio": "high"}, r"bias_ratio: 'high' is not valid; expected a number in \[0, 1\]"),
        ({"severity": 2.0}, r"severity: 2.0 is not valid; choose one of \[1, 2, 3, 4\]"),
    ],
)
def test_bad_params_name_key_and_valid_values(kw, message):
    params = dict(dataset="cmnist", bias_ratio=0.8, severity=4, seed=0, corruption_protocol="cifar10c")
    params.update(kw)
    with pytest.raises(ValueError, match=message):
        BiasConfig.from_params(params)
