import tarfile
from pathlib import Path

import numpy as np
import pytest

from biasdd.artifacts import md5_file
from biasdd.errors import UserError
from biasdd.pipeline import download
from biasdd.pipeline.download import DownloadConfig, SourceError, load_base

EMBEDDED = Path(__file__).resolve().parents[1] / "data" / "embedded"


def test_embedded_mnist_is_the_original(monkeypatch):
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    base = load_base("cmnist", None, EMBEDDED, Path("/nonexistent"), allow_download=False)
    assert base.train_images.shape == (60000, 28, 28) and base.train_images.dtype == np.uint8
    assert base.test_images.shape == (10000, 28, 28)
    assert base.train_labels.dtype == np.int64
    # the real class sizes of MNIST's training set
    assert np.bincount(base.train_labels).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert base.source.startswith("embedded")


def test_mirror_comes_first_and_env_overrides_params(fake_mnist, monkeypatch):
    root, checksums, arrays = fake_mnist
    for name, digest in checksums.items():
        monkeypatch.setitem(download.MNIST_FILES, name, digest)
    base = load_base("cmnist", str(root), EMBEDDED, Path("/nonexistent"), allow_download=False)
    assert base.source.startswith("mirror")
    np.testing.assert_array_equal(base.train_images, arrays["train_images"])
    np.testing.assert_array_equal(base.test_labels, arrays["test_labels"])
    # the environment variable wins over the params key
    monkeypatch.setenv(download.MIRROR_ENV, str(root))
    base = load_base("cmnist", "/does/not/exist", EMBEDDED, Path("/nonexistent"), allow_download=False)
    assert base.source.startswith("mirror")


def test_wrong_md5_names_the_file(fake_mnist):
    root, _, _ = fake_mnist  # checksums differ from torchvision's originals
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.gz: MD5 mismatch"):
        load_base("cmnist", str(root), EMBEDDED, Path("/nonexistent"), allow_download=False)


def test_cifar_batches_and_archive(fake_cifar, monkeypatch, tmp_path):
    root, checksums, arrays = fake_cifar
    for name, digest in checksums.items():
        monkeypatch.setitem(download.CIFAR10_FILES, name, digest)
    base = load_base("ccifar10", str(root), EMBEDDED, tmp_path / "cache", allow_download=False)
    assert base.train_images.shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(base.train_images, arrays["train_images"])
    np.testing.assert_array_equal(base.train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(base.test_images, arrays["test_images"])
    # the same files as the original .tar.gz archive
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    archive = archive_root / download.CIFAR10_ARCHIVE[0]
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / download.CIFAR10_DIR, arcname=download.CIFAR10_DIR)
    from_archive = download.load_cifar(archive, archive_md5=md5_file(archive))
    np.testing.assert_array_equal(from_archive[0], arrays["train_images"])
    with pytest.raises(SourceError, match="cifar-10-python.tar.gz: MD5 mismatch"):
        download.load_cifar(archive)


def test_no_source_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    with pytest.raises(SourceError, match="BIASDD_DATA_MIRROR"):
        load_base("ccifar10", None, EMBEDDED, tmp_path / "cache", allow_download=False)
    with pytest.raises(SourceError, match="is not a folder"):
        load_base("ccifar10", str(tmp_path / "missing"), EMBEDDED, tmp_path / "cache", allow_download=False)


def test_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)

    def offline(base, cache_dir):
        raise OSError("network unreachable")

    monkeypatch.setattr(download, "_torchvision_download", offline)
    with pytest.raises(SourceError, match="network unreachable.*download.mirror"):
        load_base("ccifar10", None, EMBEDDED, tmp_path / "cache")


def test_idx_reader_rejects_other_files(tmp_path):
    import gzip

    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x00\x07" + bytes(8))
    with pytest.raises(SourceError, match="magic 7"):
        download.read_idx_gz(bad)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dataset": "svhn"}, r"dataset: 'svhn' is not valid; choose one of \['cmnist', 'ccifar10'\]"),
        (
            {
                "download": {
                    "mirror": None,
                    "cache_dir": ".c",
                    "fetch": True,
                    "limit_train": 5,
                    "limit_test": None,
                }
            },
            "limit_train",
        ),
        (
            {
                "download": {
                    "mirror": 3,
                    "cache_dir": ".c",
                    "fetch": True,
                    "limit_train": None,
                    "limit_test": None,
                }
            },
            "download.mirror",
        ),
        (
            {
                "download": {
                    "mirror": None,
                    "cache_dir": ".c",
                    "fetch": True,
                    "limit_train": None,
                    "limit_test": None,
                    "x": 1,
                }
            },
            "unknown key",
        ),
    ],
)
def test_download_config_validation(params, message):
    full = {
        "dataset": "cmnist",
        "download": {
            "mirror": None,
            "cache_dir": ".c",
            "fetch": True,
            "limit_train": None,
            "limit_test": None,
        },
    }
    full.update(params)
    with pytest.raises((ValueError, KeyError), match=message):
        DownloadConfig.from_params(full)


def test_a_file_that_is_not_gzip_is_a_one_line_user_error(tmp_path):
    """Past its checksum (a mirror's own files), a file that is not gzip is named, with the fix."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(SourceError) as raised:
        download.read_idx_gz(path)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert (
        message.startswith(f"{path}: not a readable gzip file") and "replace it with the original" in message
    )
