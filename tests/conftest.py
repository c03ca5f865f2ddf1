"""Shared fixtures: tiny synthetic datasets written in the real on-disk formats (MNIST idx .gz, CIFAR-10
python pickle batches), so the readers and the pipeline are tested exactly as they meet the real files."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    header = (
        (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + rows.to_bytes(4, "big") + cols.to_bytes(4, "big")
    )
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    with gzip.open(path, "wb") as f:
        f.write(header + labels.astype(np.uint8).tobytes())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, np.ndarray]]:
    """<tmp>/MNIST/raw with four idx .gz files of random digits; returns (root, checksums, arrays)."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "mirror" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train_images": (rng.random((120, 28, 28)) > 0.7).astype(np.uint8)
        * rng.integers(1, 256, (120, 28, 28)),
        "train_labels": np.arange(120) % 10,
        "test_images": (rng.random((40, 28, 28)) > 0.7).astype(np.uint8) * rng.integers(1, 256, (40, 28, 28)),
        "test_labels": np.arange(40) % 10,
    }
    write_idx_images(raw / "train-images-idx3-ubyte.gz", arrays["train_images"])
    write_idx_labels(raw / "train-labels-idx1-ubyte.gz", arrays["train_labels"])
    write_idx_images(raw / "t10k-images-idx3-ubyte.gz", arrays["test_images"])
    write_idx_labels(raw / "t10k-labels-idx1-ubyte.gz", arrays["test_labels"])
    checksums = {p.name: md5(p) for p in raw.iterdir()}
    return tmp_path / "mirror", checksums, arrays


@pytest.fixture
def fake_cifar(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, np.ndarray]]:
    """<tmp>/cifar-10-batches-py with five train batches and a test batch in the original pickle format."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "mirror" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch, n_test = 20, 30
    train_images, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        blob = {
            "batch_label": f"training batch {i} of 5",
            "labels": labels,
            "data": data,
            "filenames": [f"img{j}.png" for j in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(blob, protocol=2))
        train_images.append(data)
        train_labels += labels
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(x) for x in np.arange(n_test) % 10]
    (folder / "test_batch").write_bytes(pickle.dumps({"labels": test_labels, "data": test}, protocol=2))
    checksums = {p.name: md5(p) for p in folder.iterdir()}
    arrays = {
        "train_images": np.concatenate(train_images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
        "train_labels": np.array(train_labels),
        "test_images": test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
        "test_labels": np.array(test_labels),
    }
    return tmp_path / "mirror", checksums, arrays


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none (CI, laptops);
    `benchmarks/gpu_check.sh` runs them on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
