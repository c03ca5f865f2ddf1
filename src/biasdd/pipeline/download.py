"""Where the base datasets come from, and readers for their original on-disk formats.

Sources, in order (the `download` stage):
1. a mirror folder in torchvision's layout (`download.mirror` in params.yaml, overridden by the
   environment variable `BIASDD_DATA_MIRROR`): `<mirror>/MNIST/raw/*.gz`, `<mirror>/cifar-10-batches-py/`
   or `<mirror>/cifar-10-python.tar.gz`;
2. the copy embedded in the repository (MNIST only: `data/embedded/MNIST/raw/`);
3. torchvision's own download (its URLs and MD5 checks), into `download.cache_dir`.
Every file read is MD5-verified against torchvision's checksums first.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np

from biasdd.artifacts import md5_file
from biasdd.config import Config, Range, check_value, from_dict, section
from biasdd.errors import ArtifactError
from biasdd.vocab import DATASETS, Dataset  # noqa: F401 (DATASETS: BASE_OF's keys)

log = logging.getLogger(__name__)

MIRROR_ENV = "BIASDD_DATA_MIRROR"
BASE_OF = {"cmnist": "mnist", "ccifar10": "cifar10"}

# torchvision.datasets.MNIST.resources / CIFAR10.train_list, test_list, tgz_md5.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR10_DIR = "cifar-10-batches-py"


@dataclass(frozen=True)
class DownloadConfig(Config):
    """params `dataset` and section `download`."""

    SECTION: ClassVar[str] = "download"

    dataset: Dataset
    mirror: str | None  # folder in torchvision's layout; env BIASDD_DATA_MIRROR wins
    cache_dir: str  # where torchvision's download goes when it is the source
    fetch: bool  # whether torchvision may download a dataset no local source has (false: offline)
    limit_train: Annotated[int, Range(ge=10)] | None  # keep the first n images of each split (null = all)
    limit_test: Annotated[int, Range(ge=10)] | None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DownloadConfig:
        dataset = check_value("dataset", section(params, "dataset"), Dataset)
        return from_dict(cls, {"dataset": dataset, **section(params, "download")}, "download")


class SourceError(ArtifactError):
    """No usable source for a dataset, or a source file that is corrupt or not the original: the user's to
    fix (one line naming the file or key and the fix)."""


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


@dataclass(frozen=True)
class BaseDataset:
    """A base dataset in memory: uint8 images (MNIST (N, 28, 28), CIFAR-10 (N, 32, 32, 3)), int64 labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where it came from, for provenance


def verify_md5(path: Path, expected: str) -> None:
    actual = md5_file(path)
    if actual != expected:
        raise SourceError(
            f"{path}: MD5 mismatch (expected {expected}, got {actual}); the file is corrupt or not the "
            "original: replace it with the original file"
        )


# --- readers of the original formats ---------------------------------------------------------------


def read_idx_gz(path: Path) -> np.ndarray:
    """An MNIST idx file (gzip): magic 2051 -> (N, rows, cols) uint8 images; 2049 -> (N,) labels."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # not gzip, or cut short
        raise SourceError(
            f"{path}: not a readable gzip file ({_one_line(error)}); replace it with the original file"
        ) from error
    magic = int.from_bytes(data[0:4], "big")
    count = int.from_bytes(data[4:8], "big")
    if magic == 2049:
        labels = np.frombuffer(data, dtype=np.uint8, count=count, offset=8)
        return labels.astype(np.int64)
    if magic == 2051:
        rows = int.from_bytes(data[8:12], "big")
        cols = int.from_bytes(data[12:16], "big")
        images = np.frombuffer(data, dtype=np.uint8, count=count * rows * cols, offset=16)
        return images.reshape(count, rows, cols).copy()
    raise SourceError(
        f"{path}: not an MNIST idx file (magic {magic}, expected 2049 or 2051); replace it with the original"
    )


def read_cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python pickle batch -> (N, 32, 32, 3) uint8 images, (N,) int64 labels."""
    try:
        batch = pickle.loads(blob, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise SourceError(
            f"{where}: not a CIFAR-10 python batch ({_one_line(exc)}); replace it with the original file"
        ) from exc
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


# --- locating files ---------------------------------------------------------------------------------


def mnist_dir_in(root: Path) -> Path | None:
    for candidate in (root / "MNIST" / "raw", root):
        if all((candidate / name).exists() for name in MNIST_FILES):
            return candidate
    return None


def load_mnist_dir(folder: Path, checksums: Mapping[str, str] = MNIST_FILES) -> tuple[np.ndarray, ...]:
    for name, md5 in checksums.items():
        verify_md5(folder / name, md5)
    return (
        read_idx_gz(folder / "train-images-idx3-ubyte.gz"),
        read_idx_gz(folder / "train-labels-idx1-ubyte.gz"),
        read_idx_gz(folder / "t10k-images-idx3-ubyte.gz"),
        read_idx_gz(folder / "t10k-labels-idx1-ubyte.gz"),
    )


def cifar_source_in(root: Path) -> Path | None:
    """The batches folder or the original archive under `root`, if present."""
    for folder in (root / CIFAR10_DIR, root):
        if all((folder / name).exists() for name in CIFAR10_FILES):
            return folder
    if (root / CIFAR10_ARCHIVE[0]).exists():
        return root / CIFAR10_ARCHIVE[0]
    return None


def load_cifar(
    source: Path,
    checksums: Mapping[str, str] = CIFAR10_FILES,
    archive_md5: str = CIFAR10_ARCHIVE[1],
) -> tuple[np.ndarray, ...]:
    """CIFAR-10 from the batches folder or the `.tar.gz` archive (read in memory, nothing extracted)."""
    blobs: dict[str, bytes] = {}
    if source.is_file():
        verify_md5(source, archive_md5)
        with tarfile.open(source, "r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in checksums:
                    blob = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if hashlib.md5(blob).hexdigest() != checksums[name]:
                        raise SourceError(
                            f"{source}:{member.name}: MD5 mismatch; the archive is corrupt or not the "
                            "original: replace it with the original file"
                        )
                    blobs[name] = blob
        missing = sorted(set(checksums) - set(blobs))
        if missing:
            raise SourceError(f"{source}: archive lacks {missing}; replace it with the original archive")
    else:
        for name, md5 in checksums.items():
            verify_md5(source / name, md5)
            blobs[name] = (source / name).read_bytes()
    train = [read_cifar_batch(blobs[f"data_batch_{i}"], f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = read_cifar_batch(blobs["test_batch"], "test_batch")
    return (
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        test_images,
        test_labels,
    )


def _torchvision_download(base: str, cache_dir: Path) -> Path:
    """Let torchvision fetch the files (its URLs, its MD5 checks); return the folder to read."""
    import torchvision

    cache_dir.mkdir(parents=True, exist_ok=True)
    if base == "mnist":
        torchvision.datasets.MNIST(str(cache_dir), train=True, download=True)
        return cache_dir / "MNIST" / "raw"
    torchvision.datasets.CIFAR10(str(cache_dir), train=True, download=True)
    return cache_dir / CIFAR10_DIR


def how_to_provide(base: str) -> str:
    if base == "mnist":
        layout = "<folder>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
    else:
        layout = f"<folder>/{CIFAR10_DIR}/{{data_batch_1..5,test_batch}} or <folder>/{CIFAR10_ARCHIVE[0]}"
    return (
        f"put the original files in torchvision's layout ({layout}) and point the pipeline at the folder "
        f"with `download.mirror` in params.yaml or the environment variable {MIRROR_ENV}"
    )


def load_base(
    dataset: str,
    mirror: str | None,
    embedded_dir: Path,
    cache_dir: Path,
    allow_download: bool = True,
) -> BaseDataset:
    """The base dataset of `dataset` (`cmnist` -> MNIST, `ccifar10` -> CIFAR-10) from the first source."""
    if dataset not in BASE_OF:
        raise ValueError(f"dataset: {dataset!r} is not valid; choose one of {list(DATASETS)}")
    base = BASE_OF[dataset]
    mirror = os.environ.get(MIRROR_ENV) or mirror
    tried: list[str] = []
    arrays: tuple[np.ndarray, ...] | None = None
    source = ""
    if mirror:
        root = Path(mirror).expanduser()
        if not root.is_dir():
            where = MIRROR_ENV if os.environ.get(MIRROR_ENV) else "download.mirror"
            raise SourceError(
                f"{where}: {str(root)!r} is not a folder; set it to a folder in torchvision's layout "
                "(docs/data.md) or unset it"
            )
        found = mnist_dir_in(root) if base == "mnist" else cifar_source_in(root)
        if found is not None:
            arrays = load_mnist_dir(found) if base == "mnist" else load_cifar(found)
            source = f"mirror:{found}"
        else:
            tried.append(f"mirror {root} (no {base} files there)")
    if arrays is None and base == "mnist":
        found = mnist_dir_in(embedded_dir)
        if found is not None:
            arrays = load_mnist_dir(found)
            source = "embedded:data/embedded/MNIST/raw"
        else:
            tried.append(f"embedded copy {embedded_dir}")
    if arrays is None and base == "cifar10":
        found = cifar_source_in(cache_dir)
        if found is not None:
            arrays, source = load_cifar(found), f"cache:{found}"
    if arrays is None and allow_download:
        try:
            folder = _torchvision_download(base, cache_dir)
        except Exception as exc:  # no network, DNS failure, HTTP error...
            tried.append(f"torchvision download into {cache_dir} ({_one_line(exc)})")
        else:
            arrays = load_mnist_dir(folder) if base == "mnist" else load_cifar(folder)
            source = "torchvision-download"
    if arrays is None and not allow_download:
        tried.append("no download (download.fetch is false)")
    if arrays is None:
        raise SourceError(
            f"no source for {base}: tried {'; '.join(tried)}. To fix it, {how_to_provide(base)}"
        )
    log.info("%s loaded from %s", base, source)
    return BaseDataset(base, *arrays, source=source)


def base_groups(
    base: BaseDataset, cfg: DownloadConfig
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """The HDF5 layout of a base dataset (optionally cut to the first n images) and its attributes."""
    limit_train = cfg.limit_train or len(base.train_labels)
    limit_test = cfg.limit_test or len(base.test_labels)
    groups = {
        "train": {"images": base.train_images[:limit_train], "labels": base.train_labels[:limit_train]},
        "test": {"images": base.test_images[:limit_test], "labels": base.test_labels[:limit_test]},
    }
    # Where the files came from is logged, not stored: MD5-verified sources give the same bytes, so the
    # artifact (and DVC's hash of it) does not depend on the mirror path.
    attrs = {
        "dataset": cfg.dataset,
        "base": base.name,
        "limit_train": cfg.limit_train or "all",
        "limit_test": cfg.limit_test or "all",
    }
    return groups, attrs
