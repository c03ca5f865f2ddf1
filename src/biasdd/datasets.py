"""The pipeline's artifacts as torch `Dataset`s, for use outside the pipeline.

In torchvision's conventions (`transform`, `target_transform`, `classes`, `targets`), with items
`(image, label, attribute)`:

- `BiasedDataset`: a split (`train`, `test_conflicting`, `test_uniform`) of `data/biased.h5`
  (CMNIST-DD / CCIFAR10-DD). Images are PIL images, as torchvision's MNIST and CIFAR10 give them, so
  `transforms.ToTensor()` and friends apply; `attribute` is the bias attribute (docs/protocol.md §2).
- `SyntheticDataset`: one distillation (`repeat`) of `data/synthetic/<method>.h5`. Images are float32
  tensors (C, H, W) in the normalised space they were distilled in (`normalised=False`: pixels in
  [0, 1]); a synthetic image has no bias attribute, so `attribute` is -1.

Each loads from a path, or from any git revision or DVC experiment of a repository through `dvc.api`
(`from_dvc(path, repo=..., rev=...)`; needs dvc):

    from torchvision import transforms
    from biasdd.datasets import BiasedDataset, SyntheticDataset

    train = BiasedDataset("data/biased.h5", "train", transform=transforms.ToTensor())
    image, label, attribute = train[0]
    dm = SyntheticDataset.from_dvc("data/synthetic/dm.h5", rev="cmnist-rho0.95-sev4-quick")
"""

from __future__ import annotations

import io as _io
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from biasdd import artifacts
from biasdd.vocab import SPLITS

CLASSES = {
    "cmnist": [str(d) for d in range(10)],
    "ccifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
NO_ATTRIBUTE = -1

Source = str | Path | BinaryIO


def _open_dvc(path: str, repo: str | None, rev: str | None) -> BinaryIO:
    """The bytes of `path` at `rev` of `repo` (a local path or git URL), through DVC's cache or remote."""
    try:
        import dvc.api
    except ImportError as error:  # pragma: no cover - dvc is a dependency of the package
        raise ImportError("from_dvc needs dvc (pip install dvc)") from error
    with dvc.api.open(path, repo=repo, rev=rev, mode="rb") as f:
        return _io.BytesIO(f.read())


class BiasedDataset(Dataset):
    """A split of a biased dataset artifact (`data/biased.h5`); items `(image, label, attribute)`."""

    def __init__(
        self,
        source: Source,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: {split!r} is not valid; choose one of {list(SPLITS)}")
        data = artifacts.read_h5(source, split, ("images", "labels", "attributes"), kind="biased")
        attrs = artifacts.read_attrs(source, kind="biased")
        self.split = split
        self.dataset = str(attrs.get("dataset"))
        self.bias_ratio = attrs.get("bias_ratio")
        self.severity = attrs.get("severity")
        self.images = data["images"]  # (N, C, H, W) uint8
        self.targets = torch.from_numpy(data["labels"].astype(np.int64))
        self.attributes = torch.from_numpy(data["attributes"].astype(np.int64))
        self.classes = CLASSES.get(self.dataset, [str(c) for c in range(int(self.targets.max()) + 1)])
        stats = artifacts.read_h5(source, "train", ("mean", "std"), kind="biased")
        self.mean, self.std = stats["mean"], stats["std"]  # of the training split, in [0, 1] units
        self.transform = transform
        self.target_transform = target_transform

    @classmethod
    def from_dvc(
        cls,
        path: str = "data/biased.h5",
        split: str = "train",
        repo: str | None = None,
        rev: str | None = None,
        **kwargs: Any,
    ) -> BiasedDataset:
        """Load from a revision (commit, branch, tag or experiment name) of a DVC repository."""
        return cls(_open_dvc(path, repo, rev), split, **kwargs)

    @property
    def aligned(self) -> Tensor:
        """(N,) bool: attribute == label (bias-aligned)."""
        return self.attributes == self.targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        from PIL import Image

        image: Any = Image.fromarray(np.ascontiguousarray(self.images[index].transpose(1, 2, 0)), mode="RGB")
        label: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label, int(self.attributes[index])


class SyntheticDataset(Dataset):
    """One distillation of a synthetic set artifact (`data/synthetic/<method>.h5`); items
    `(image, label, -1)` with float32 images (C, H, W)."""

    def __init__(
        self,
        source: Source,
        repeat: int = 0,
        transform: Callable[[Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        normalised: bool = True,
    ) -> None:
        groups = [g for g in artifacts.list_groups(source, kind="synthetic") if g.startswith("repeat_")]
        if f"repeat_{repeat}" not in groups:
            raise ValueError(
                f"repeat: {repeat!r} is not valid; this file holds {len(groups)} distillation(s)"
            )
        data = artifacts.read_h5(source, f"repeat_{repeat}", ("images", "labels"), kind="synthetic")
        norm = artifacts.read_h5(source, "normalisation", ("mean", "std"), kind="synthetic")
        attrs = artifacts.read_attrs(source, kind="synthetic")
        self.method = attrs.get("method")
        self.budget = attrs.get("budget")
        self.dataset = str(attrs.get("dataset"))
        self.mean, self.std = norm["mean"], norm["std"]
        images = torch.from_numpy(data["images"]).float()  # (N, C, H, W), normalised
        if not normalised:
            mean = torch.as_tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            images = (images * std + mean).clamp_(0.0, 1.0)
        self.images = images
        self.normalised = normalised
        self.targets = torch.from_numpy(data["labels"].astype(np.int64))
        self.classes = CLASSES.get(self.dataset, [str(c) for c in range(int(self.targets.max()) + 1)])
        self.transform = transform
        self.target_transform = target_transform

    @classmethod
    def from_dvc(
        cls, path: str, repeat: int = 0, repo: str | None = None, rev: str | None = None, **kwargs: Any
    ) -> SyntheticDataset:
        """Load from a revision (commit, branch, tag or experiment name) of a DVC repository."""
        return cls(_open_dvc(path, repo, rev), repeat, **kwargs)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image: Any = self.images[index]
        label: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label, NO_ATTRIBUTE
