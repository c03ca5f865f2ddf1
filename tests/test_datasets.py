"""biasdd.datasets: the artifacts as torch Datasets, from a path or from a git revision through dvc.api."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from biasdd import artifacts
from biasdd.datasets import NO_ATTRIBUTE, BiasedDataset, SyntheticDataset

from .tiny import run

K = 10


def _biased(path, shift: int = 0) -> dict:
    rng = np.random.default_rng(shift)
    groups = {}
    for split, n in (("train", 40), ("test_conflicting", 20), ("test_uniform", 20)):
        labels = np.arange(n) % K
        attributes = (labels + (split != "train") + shift) % K
        groups[split] = {
            "images": rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8),
            "labels": labels.astype(np.int64),
            "attributes": attributes.astype(np.int64),
            "aligned": attributes == labels,
        }
    groups["train"]["mean"] = np.array([0.5, 0.4, 0.3])
    groups["train"]["std"] = np.array([0.2, 0.2, 0.2])
    artifacts.write_h5(path, groups, {"dataset": "cmnist", "bias_ratio": 0.9, "severity": 4}, kind="biased")
    return groups


def _synthetic(path) -> dict:
    images = np.linspace(-2, 2, 2 * K * 3 * 28 * 28, dtype=np.float32).reshape(2 * K, 3, 28, 28)
    groups = {
        "normalisation": {"mean": np.array([0.5, 0.5, 0.5]), "std": np.array([0.25, 0.25, 0.25])},
        "repeat_0": {"images": images, "labels": np.repeat(np.arange(K), 2), "loss": np.zeros(3)},
        "repeat_1": {"images": -images, "labels": np.repeat(np.arange(K), 2), "loss": np.zeros(3)},
    }
    artifacts.write_h5(
        path, groups, {"method": "dm", "budget": "quick", "dataset": "cmnist"}, kind="synthetic"
    )
    return groups


def test_biased_dataset_in_torchvision_conventions(tmp_path):
    groups = _biased(tmp_path / "biased.h5")
    plain = BiasedDataset(tmp_path / "biased.h5", "test_conflicting")
    image, label, attribute = plain[3]
    assert image.size == (28, 28) and image.mode == "RGB"  # a PIL image, as torchvision's MNIST gives
    np.testing.assert_array_equal(
        np.asarray(image), groups["test_conflicting"]["images"][3].transpose(1, 2, 0)
    )
    assert (label, attribute) == (3, 4) and len(plain) == 20 and plain.classes[3] == "3"
    assert not plain.aligned.any() and plain.bias_ratio == 0.9

    def to_tensor(pil) -> torch.Tensor:
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255

    train = BiasedDataset(
        tmp_path / "biased.h5", "train", transform=to_tensor, target_transform=lambda y: y + 100
    )
    images, labels, attributes = next(iter(DataLoader(train, batch_size=8)))
    assert images.shape == (8, 3, 28, 28) and labels.tolist() == [100 + i for i in range(8)]
    assert attributes.tolist() == list(range(8)) and train.aligned.all()
    np.testing.assert_allclose(train.mean, [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match=r"split: 'valid' is not valid; choose one of"):
        BiasedDataset(tmp_path / "biased.h5", "valid")


def test_synthetic_dataset_each_distillation_both_spaces(tmp_path):
    groups = _synthetic(tmp_path / "dm.h5")
    first = SyntheticDataset(tmp_path / "dm.h5")
    image, label, attribute = first[5]
    assert torch.equal(image, torch.from_numpy(groups["repeat_0"]["images"][5]))
    assert (label, attribute) == (2, NO_ATTRIBUTE) and len(first) == 2 * K and first.method == "dm"
    second = SyntheticDataset(tmp_path / "dm.h5", repeat=1, normalised=False)
    expected = np.clip(-groups["repeat_0"]["images"][5] * 0.25 + 0.5, 0, 1)
    np.testing.assert_allclose(second[5][0].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="holds 2 distillation"):
        SyntheticDataset(tmp_path / "dm.h5", repeat=2)


def test_datasets_refuse_the_wrong_artifact(tmp_path):
    _synthetic(tmp_path / "dm.h5")
    with pytest.raises(FileNotFoundError, match="expected a 'biased' artifact|lacks|no group"):
        BiasedDataset(tmp_path / "dm.h5")


@pytest.mark.slow
def test_from_a_git_revision_through_dvc_api(tmp_path):
    """Two commits of a DVC-tracked biased.h5: each revision gives its own data."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "init", "-q")
    first = _biased(repo / "data/biased.h5", shift=0)
    run(repo, "dvc", "add", "-q", "data/biased.h5")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "first")
    second = _biased(repo / "data/biased.h5", shift=1)
    run(repo, "dvc", "add", "-q", "data/biased.h5")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "second")
    old = BiasedDataset.from_dvc("data/biased.h5", "train", repo=str(repo), rev="HEAD~1")
    new = BiasedDataset.from_dvc("data/biased.h5", "train", repo=str(repo), rev="main")
    assert torch.equal(old.attributes, torch.from_numpy(first["train"]["attributes"]))
    assert torch.equal(new.attributes, torch.from_numpy(second["train"]["attributes"]))
    assert not torch.equal(old.attributes, new.attributes)
