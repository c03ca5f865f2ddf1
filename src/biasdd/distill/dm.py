"""Dataset Condensation with Distribution Matching (DM; Zhao & Bilen 2023; reference `main_DM.py`).

Each iteration draws a fresh random network (frozen), embeds every class's real batch in ONE forward
pass (no graph) and all synthetic images in ONE pass, and matches per-class mean embeddings:
loss = sum_c || mean embed(aug(real_c)) - mean embed(aug(syn_c)) ||^2. Augmentation is one siamese
`dsa_augment` call over the concatenated real and synthetic images with the class as group id.

The network is built once and re-drawn in place from the generator each iteration
(`common.FreshNetworks`): same init distribution, no module construction in the hot loop.

Debiased targets (`debias`, issue 6; see `biasdd.debias`): the real batch of class c is drawn with
probability proportional to the per-sample weights (importance sampling), so its plain mean embedding
estimates the weighted mean mu_g; with a repulsion lambda > 0 a second real batch, drawn from the
bias-aligned weights, estimates mu_b and the loss becomes `debiased_embedding_loss`.
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


def debiased_embedding_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    aligned_images: Tensor,
    repulsion: float,
    max_shift: float,
    valid: Tensor | None = None,
) -> Tensor:
    """sum_c ||mu_S - mu_g||^2 - lambda * min(||mu_S - mu_b||^2, (1 + max_shift)^2 ||mu_g - mu_b||^2).

    mu_g: mean embedding of `real_images` (the debiased target, A_g), mu_b: of `aligned_images` (the
    bias-aligned estimate, A_b), mu_S: of `syn_images`; all (K, n, C, H, W). Real sides are detached.

    Why this form: a plain -lambda ||mu_S - mu_b||^2 is unbounded below for lambda >= 1 (mu_S runs off).
    The cap makes the repulsion a hinge that switches off once mu_S is (1 + max_shift) times as far from
    mu_b as mu_g is, so the loss is >= -lambda (1 + max_shift)^2 sum_c ||mu_g - mu_b||^2 (a detached
    constant per iteration) and the gradient is bounded. Scaling the cap by ||mu_g - mu_b||^2 makes it
    free of the embedding's scale (which changes with every fresh network). For lambda < 1 and an
    inactive cap the optimum is mu_S = mu_g + lambda / (1 - lambda) (mu_g - mu_b): an extrapolation away
    from the bias, by at most `max_shift` * |mu_g - mu_b| for any lambda.
    `valid` (K,) bool drops the repulsion of classes without an aligned estimate.
    """
    num_classes = real_images.shape[0]
    with torch.no_grad():
        both = torch.cat([real_images.flatten(0, 1), aligned_images.flatten(0, 1)])
        embedded = net.embed(both)
        split = real_images.shape[0] * real_images.shape[1]
        real_mean = embedded[:split].view(num_classes, real_images.shape[1], -1).mean(1)
        aligned_mean = embedded[split:].view(num_classes, aligned_images.shape[1], -1).mean(1)
        cap = (1 + max_shift) ** 2 * ((real_mean - aligned_mean) ** 2).sum(1)  # (K,)
    syn_mean = net.embed(syn_images.flatten(0, 1)).view(num_classes, syn_images.shape[1], -1).mean(1)
    attraction = ((real_mean - syn_mean) ** 2).sum(1)  # (K,)
    repelled = torch.minimum(((aligned_mean - syn_mean) ** 2).sum(1), cap)  # (K,)
    if valid is not None:
        repelled = repelled * valid.to(repelled.dtype)
    return (attraction - repulsion * repelled).sum()


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
    debias: common.DebiasTargets | None = None,
) -> common.DistillResult:
    """Distil with DM (siamese DSA when `dsa` is given, as in the paper). Loss per iteration: the
    per-class mean of the summed distance (the reference's logged `loss_avg`), including the repulsion
    term when `debias.repulsion` > 0. `debias=None` is the plain method."""
    common.check_inputs(real_images, real_labels, num_classes)
    sampler = common.ClassSampler(real_labels, num_classes)
    sampling = common.real_sampling(sampler, real_labels, num_classes, debias)
    shape = real_images.shape[1:]
    ipc, batch_real = cfg.ipc, cfg.batch_real
    device = real_images.device

    syn = common.init_synthetic(real_images, sampling.init, ipc, cfg.init, generator).requires_grad_(True)
    group_parts = [common.class_labels(num_classes, batch_real, device)]
    if sampling.aligned is not None:  # the aligned batch shares its class's augmentation parameters
        group_parts.append(common.class_labels(num_classes, batch_real, device))
    groups = torch.cat([*group_parts, common.class_labels(num_classes, ipc, device)])
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
        real = real_images[sampling.target.sample(batch_real, generator)]  # (K * batch_real, C, H, W)
        syn_in = syn
        if sampling.aligned is None:
            if dsa is not None:
                augmented = dsa_augment(torch.cat([real, syn]), dsa, generator, groups=groups)
                real, syn_in = augmented[: real.shape[0]], augmented[real.shape[0] :]
            loss = embedding_loss(
                net, real.view(num_classes, batch_real, *shape), syn_in.view(num_classes, ipc, *shape)
            )
        else:
            aligned = real_images[sampling.aligned.sample(batch_real, generator)]  # (K * batch_real, ...)
            if dsa is not None:
                augmented = dsa_augment(torch.cat([real, aligned, syn]), dsa, generator, groups=groups)
                real, aligned, syn_in = augmented.split([real.shape[0], aligned.shape[0], syn.shape[0]])
            loss = debiased_embedding_loss(
                net,
                real.view(num_classes, batch_real, *shape),
                syn_in.view(num_classes, ipc, *shape),
                aligned.view(num_classes, batch_real, *shape),
                sampling.repulsion,
                sampling.max_shift,
                sampling.aligned_valid,
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
