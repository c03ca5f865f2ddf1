"""Tests for biasdd.pipeline.evaluate: group-wise metrics, summaries over repeats, scoring an ensemble,
and the compact metrics files."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from biasdd.errors import ArtifactError, ConfigError
from biasdd.pipeline.evaluate import evaluate_ensemble, group_hits, group_metrics, summarise, train_at_rates
from biasdd.training.trainer import train_networks

from .test_train import IM_SIZE, make_cfg, max_weight_diff, noisy_flip, tiny_factory

NUM_CLASSES = 3


# --- metrics -----------------------------------------------------------------------------------------


def test_group_metrics_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    attributes = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    pred = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1])
    # aligned: idx 0,1 (class 0), 3 (class 1), 6 (class 2) -> correct 0,3,6 = 3/4
    # conflicting: idx 2 (c0,a1), 4,5 (c1,a2), 7 (c2,a0) -> correct 2,4 = 2/4
    # groups: (0,0) 1/2, (0,1) 1/1, (1,1) 1/1, (1,2) 1/2, (2,2) 1/1, (2,0) 0/1 -> worst 0
    metrics = group_metrics(pred, labels, attributes, NUM_CLASSES)
    assert metrics == {
        "accuracy": 5 / 8,
        "aligned_accuracy": 3 / 4,
        "conflicting_accuracy": 2 / 4,
        "worst_group_accuracy": 0.0,
        "n": 8,
    }


def test_group_hits_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    attributes = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    correct = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0])
    counts, hits = group_hits(correct, labels, attributes, NUM_CLASSES)
    # at class * 3 + attribute, samples/hits: (0,0) 2/1, (0,1) 1/1, (1,1) 1/1, (1,2) 2/1, (2,2) 1/1, (2,0) 1/0
    assert counts.tolist() == [2, 1, 0, 0, 1, 2, 1, 0, 1]
    assert hits.tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 1]
    assert counts.dtype == hits.dtype == torch.float64


def test_group_metrics_without_aligned_samples() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2])
    attributes = torch.tensor([1, 2, 0, 0, 1])  # rho = 0: every sample conflicts
    pred = torch.tensor([0, 0, 1, 2, 0])
    metrics = group_metrics(pred, labels, attributes, NUM_CLASSES)
    assert metrics["aligned_accuracy"] is None
    assert metrics["conflicting_accuracy"] == metrics["accuracy"] == 4 / 5
    assert metrics["worst_group_accuracy"] == 0.0  # group (2, 1): its one sample is wrong
    assert metrics["n"] == 5


def test_group_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        group_metrics(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.zeros(3), 3)
    with pytest.raises(ValueError, match="0..2"):
        group_metrics(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]), torch.tensor([0, 0]), 3)


def test_summarise() -> None:
    per_repeat = [
        {"accuracy": 0.5, "aligned_accuracy": None, "n": 10},
        {"accuracy": 0.7, "aligned_accuracy": None, "n": 10},
        {"accuracy": 0.9, "aligned_accuracy": 0.4, "n": 10},
    ]
    summary = summarise(per_repeat)
    assert summary["accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["accuracy"]["std"] == pytest.approx(math.sqrt(0.08 / 3))  # ddof = 0
    assert summary["accuracy"]["values"] == [0.5, 0.7, 0.9]
    assert summary["aligned_accuracy"] == {"mean": 0.4, "std": 0.0, "values": [None, None, 0.4]}
    assert summary["n"]["mean"] == 10 and summary["n"]["std"] == 0.0
    assert summarise([{"accuracy": 0.3}])["accuracy"] == {"mean": 0.3, "std": 0.0, "values": [0.3]}
    assert summarise([{"x": None}, {"x": None}])["x"] == {"mean": None, "std": None, "values": [None, None]}


# --- end to end --------------------------------------------------------------------------------------


def planted_dataset(num_per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Class c lights up row band c of the image; the attribute is a colour channel, aligned for
    2/3 of the samples."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(num_per_class)
    attributes = labels.clone()
    attributes[1::3] = (labels[1::3] + 1) % NUM_CLASSES
    images = 0.3 * torch.randn(labels.shape[0], 3, IM_SIZE, IM_SIZE, generator=generator)
    for c in range(NUM_CLASSES):
        images[labels == c, :, 2 * c : 2 * c + 2, :] += 2.0
    images[torch.arange(labels.shape[0]), attributes] += 0.5
    return images, labels, attributes


def test_end_to_end_planted_dataset() -> None:
    g = torch.Generator().manual_seed(0)
    train_images, train_labels, _ = planted_dataset(20, g)
    test_images, test_labels, test_attributes = planted_dataset(30, g)
    cfg = make_cfg(epochs=20, lr=0.05, batch_size=16, lr_milestones=(15,))
    ensemble = train_networks(
        train_images,
        train_labels,
        tiny_factory(torch.float32),
        cfg,
        [torch.Generator().manual_seed(s) for s in (10, 11, 12)],
        augment=noisy_flip,
        progress=False,
    )
    assert ensemble.num_networks == 3
    assert ensemble.train_loss is not None and ensemble.train_loss.shape == (3,)

    splits = {"test": (test_images, test_labels, test_attributes)}
    results = evaluate_ensemble(ensemble, splits, NUM_CLASSES, batch_size=32)
    summary = results["test"]["summary"]
    assert len(results["test"]["per_repeat"]) == 3
    assert summary["accuracy"]["mean"] > 0.9
    assert summary["n"]["values"] == [90, 90, 90]

    # predict() agrees with the unstacked modules run one by one, and the networks differ.
    nets = ensemble.unstack()
    pred = ensemble.predict(test_images, batch_size=32)
    assert pred.shape == (3, 90) and pred.dtype == torch.int64
    for r, net in enumerate(nets):
        with torch.no_grad():
            assert torch.equal(net.eval()(test_images).argmax(-1), pred[r])
    assert max_weight_diff(nets[0], nets[1]) > 1e-3
    assert max_weight_diff(nets[1], nets[2]) > 1e-3


# --- `lr: learned` (MTT's sets are evaluated at their learned learning rate) ---------------------------


def test_networks_at_their_own_rates_equal_networks_trained_alone() -> None:
    """`train_at_rates` groups networks by rate: each equals a network trained alone at its rate, and a
    network's rate changes it."""
    g = torch.Generator().manual_seed(0)
    images, labels, _ = planted_dataset(6, g)
    per_set = torch.stack([images, images.flip(-1)]).double()  # two synthetic sets (tiny_factory: float64)
    cfg = make_cfg(epochs=3)
    seeds, rates = (20, 21, 22), [0.05, 0.01, 0.05]
    sets = per_set[[0, 1, 0]]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    ensemble = train_at_rates(
        sets, labels.expand(3, -1), tiny_factory(), cfg, generators(), rates, progress=False
    )
    for r, (seed, rate) in enumerate(zip(seeds, rates, strict=True)):
        alone = train_networks(
            sets[r], labels, tiny_factory(), dataclasses.replace(cfg, lr=rate),
            [torch.Generator().manual_seed(seed)], progress=False,
        )  # fmt: skip
        for name, value in alone.params.items():
            assert torch.equal(ensemble.params[name][r], value[0]), (r, name)
    at_one_rate = train_at_rates(
        sets, labels.expand(3, -1), tiny_factory(), cfg, generators(), None, progress=False
    )
    name = next(iter(at_one_rate.params))
    assert torch.equal(at_one_rate.params[name][0], ensemble.params[name][0])  # 0.05 = cfg.lr
    assert not torch.equal(at_one_rate.params[name][1], ensemble.params[name][1])  # 0.01 != cfg.lr


def test_learned_rates_are_read_per_set_and_checked(tmp_path) -> None:
    from biasdd import artifacts
    from biasdd.pipeline import evaluate

    from .tiny import tiny_params

    params = {**tiny_params(tmp_path), "device": "cpu"}
    setup = evaluate.configure(params, "mtt")
    assert setup.learned_lr and setup.provenance()["train"]["lr"] == "learned"
    assert not evaluate.configure(params, "dm").learned_lr
    setup = dataclasses.replace(setup, shared=dataclasses.replace(setup.shared, repeats=3))
    path = tmp_path / "mtt.h5"
    groups = {f"repeat_{r}": {"labels": np.zeros(2, np.int64), "@attrs": {"learned_lr": lr}}
              for r, lr in enumerate([0.02, 0.03])}  # fmt: skip
    artifacts.write_h5(path, groups, {}, kind="synthetic")
    assert evaluate.learned_rates(setup, path, 2) == [0.02, 0.03, 0.02]  # network r: set r mod 2
    artifacts.write_h5(path, {"repeat_0": {"labels": np.zeros(2, np.int64)}}, {}, kind="synthetic")
    with pytest.raises(ConfigError, match=r"schedule\.cmnist\.mtt\.lr: 'learned', but .* holds no learned"):
        evaluate.learned_rates(setup, path, 1)
    groups = {"repeat_0": {"labels": np.zeros(2, np.int64), "@attrs": {"learned_lr": -0.5}}}
    artifacts.write_h5(path, groups, {}, kind="synthetic")
    with pytest.raises(ArtifactError, match=r"learned learning rate is -0\.5, not a positive number .*lr_lr"):
        evaluate.learned_rates(setup, path, 1)
