"""Networks used to distil and to evaluate, behind a name -> factory registry.

ConvNet-3 is the field's default (docs/protocol.md §5; Zhao & Bilen's `ConvNet`, depth 3, width 128,
instance norm, ReLU, average pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvNet(nn.Module):
    """`depth` blocks of [conv 3x3 -> instance norm -> ReLU -> avg-pool 2x2], then a linear classifier.

    Instance norm is GroupNorm with one group per channel and an affine transform, as in the reference.
    28x28 inputs get padding 3 on the first conv so that they flow as 32x32 (docs/protocol.md §5;
    **decision**: also for 3-channel CMNIST-DD).
    """

    def __init__(
        self, channels: int, num_classes: int, im_size: int, width: int = 128, depth: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = im_size
        in_channels = channels
        for block in range(depth):
            padding = 3 if (block == 0 and im_size == 28) else 1
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers.append(nn.GroupNorm(width, width, affine=True))
            layers.append(nn.ReLU(inplace=False))
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            size //= 2
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * size * size  # 128 * 4 * 4 = 2048 for 32x32 / padded 28x28
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier: (N, C, H, W) -> (N, embed_dim)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _convnet3(channels: int, num_classes: int, im_size: int, width: int) -> nn.Module:
    return ConvNet(channels, num_classes, im_size, width=width, depth=3)


NETWORKS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "convnet3": _convnet3,
}


def build_network(
    name: str,
    channels: int,
    num_classes: int,
    im_size: int,
    width: int = 128,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A freshly initialised network from the registry.

    With `generator`, the default torch init is drawn from it (the global RNG is left untouched), so a
    seed fixes the weights.
    """
    if name not in NETWORKS:
        raise KeyError(f"network: {name!r} is not registered; choose one of {sorted(NETWORKS)}")
    if generator is None:
        return NETWORKS[name](channels, num_classes, im_size, width)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETWORKS[name](channels, num_classes, im_size, width)
