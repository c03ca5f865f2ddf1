"""Dataset Condensation with Distribution Matching (DM; Zhao & Bilen 2023; reference `main_DM.py`).

Each iteration draws a fresh random network (frozen), embeds every class's real batch in ONE forward
pass (no graph) and all synthetic images in ONE pass, and matches per-class mean embeddings:
loss = sum_c || mean embed(aug(real_c)) - mean embed(aug(syn_c)) ||^2. Augmentation is one siamese
`dsa_augment` call over the concatenated real and synthetic images with the class as group id.

The network is built once and re-drawn in place from the generator each iteration
(`common.FreshNetworks`): same init distribution, no module construction in the hot loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from biasdd.augment import DSAConfig, dsa_augment
from biasdd.distill import common


@dataclass(frozen=True)
class DMConfig:
    """DM settings (PROTOCOL section 6); values come from params.yaml."""

    ipc: int  # synthetic images per class
    iterations: int  # 20000
    lr_img: float  # image SGD learning rate (1.0)
    momentum_img: float  # image SGD momentum (0.5)
    batch_real: int  # real images per class per iteration (256)
    init: Literal["noise", "real"]  # real in the paper

    def __post_init__(self) -> None:
        common.check_positive_ints("distill.dm", self, ("ipc", "iterations", "batch_real"))
        common.check_optimiser("distill.dm", self, ("lr_img",), ("momentum_img",))
        common.check_init("distill.dm", self.init)


def embedding_loss(net: nn.Module, real_images: Tensor, syn_images: Tensor) -> Tensor:
    """sum_c || mean embed(real_c) - mean embed(syn_c) ||^2; differentiable wrt `syn_images` only.

    real_images (K, n_real, C, H, W), syn_images (K, ipc, C, H, W); slice c holds class c. `net` needs an
    `embed` method (features before the classifier); each side is one forward pass.
    """
    num_classes = real_images.shape[0]
    with torch.no_grad():
        real_mean = net.embed(real_images.flatten(0, 1)).view(num_classes, real_images.shape[1], -1).mean(1)
    syn_mean = net.embed(syn_images.flatten(0, 1)).view(num_classes, syn_images.shape[1], -1).mean(1)
    return ((real_mean - syn_mean) ** 2).sum()


def distill(
    real_images: Tensor,
    real_labels: Tensor,
    num_classes: int,
    cfg: DMConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    dsa: DSAConfig | None = None,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> common.DistillResult:
    """Distil with DM (siamese DSA when `dsa` is given, as in the paper). Loss per iteration: the
    per-class mean of the summed distance (the reference's logged `loss_avg`)."""
    common.check_inputs(real_images, real_labels, num_classes)
    sampler = common.ClassSampler(real_labels, num_classes)
    shape = real_images.shape[1:]
    ipc, batch_real = cfg.ipc, cfg.batch_real
    device = real_images.device

    syn = common.init_synthetic(real_images, sampler, ipc, cfg.init, generator).requires_grad_(True)
    groups = torch.cat(
        [common.class_labels(num_classes, batch_real, device), common.class_labels(num_classes, ipc, device)]
    )
    optimizer_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)
    networks = common.FreshNetworks(net_factory, generator)
    if not hasattr(networks.net, "embed"):
        raise ValueError("net_factory: DM needs a network with an `embed` method (features before the head)")

    start, log = 0, common.LossLog()
    if resume is not None:
        start, log = common.restore_state(resume, syn, optimizer_img, generator, cfg.iterations)

    bar = common.progress_bar(start, cfg.iterations, "dm", progress)
    for iteration in bar:
        net = networks.next(generator)
        net.train()  # as the reference; ConvNet's instance norm has no train/eval difference
        net.requires_grad_(False)
        real = real_images[sampler.sample(batch_real, generator)]  # (K * batch_real, C, H, W)
        syn_in = syn
        if dsa is not None:
            augmented = dsa_augment(torch.cat([real, syn]), dsa, generator, groups=groups)
            real, syn_in = augmented[: real.shape[0]], augmented[real.shape[0] :]
        loss = embedding_loss(
            net, real.view(num_classes, batch_real, *shape), syn_in.view(num_classes, ipc, *shape)
        )
        optimizer_img.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_img.step()
        log.append(loss.detach() / num_classes)
        common.update_progress(bar, iteration, log)
        common.maybe_checkpoint(
            iteration + 1, checkpoint_every, on_checkpoint, syn, optimizer_img, generator, log
        )
    return common.finish(syn, num_classes, ipc, log)
