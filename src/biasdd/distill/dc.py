"""Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen 2021; reference `main.py`).

Each outer iteration takes a freshly initialised network; `outer_loop` times it matches, class by
class, the gradient of the loss on a real batch with that on the class's synthetic images (one image
step on the summed distance), and between those steps trains the network for `inner_loop` epochs on
the synthetic set. DSA (`dsa.py`) is this loop with siamese augmentation switched on.

Per-class gradients are batched: `torch.func.vmap` over the class axis of `torch.func.grad` gives all
K parameter gradients from one batched forward/backward (the real images of class c and its synthetic
images each form one slice of a (K, n, C, H, W) tensor). The synthetic side stays differentiable wrt
the images (the transforms compose with autograd, like `create_graph=True`). If that path fails on some
torch version, a per-class loop with `torch.autograd.grad` takes over (same maths, logged once).

Debiased targets (`debias`, issue 6; see `biasdd.debias`): the real batch of class c is drawn with
probability proportional to the per-sample weights (importance sampling), so the gradient of its plain
mean CE estimates the gradient of the weighted mean CE; with a repulsion lambda > 0 a second real batch,
drawn from the bias-aligned weights, gives g_b and the loss becomes `debiased_matching_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from biasdd.augment import DSAConfig, dsa_augment
from biasdd.distill import common

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradientMatchingConfig:
    """Settings shared by DC and DSA (PROTOCOL section 6); values come from params.yaml."""

    ipc: int  # synthetic images per class
    iterations: int  # outer iterations (1000)
    outer_loop: int  # image steps per outer iteration (50 at IPC 50, 10 at IPC 10, 1 at IPC 1)
    inner_loop: int  # network epochs on the synthetic set between image steps (10 / 50 / 1)
    lr_img: float  # image SGD learning rate (0.1)
    momentum_img: float  # image SGD momentum (0.5)
    lr_net: float  # network SGD learning rate (0.01)
    batch_real: int  # real images per class per matching step (256)
    batch_train: int  # batch size of the network updates on the synthetic set (256)
    init: Literal["noise", "real"]  # DC: noise, DSA: real

    def __post_init__(self) -> None:
        where = self._where()
        common.check_positive_ints(
            where, self, ("ipc", "iterations", "outer_loop", "inner_loop", "batch_real", "batch_train")
        )
        common.check_optimiser(where, self, ("lr_img", "lr_net"), ("momentum_img",))
        common.check_init(where, self.init)

    def _where(self) -> str:
        return "distill.dc"


@dataclass(frozen=True)
class DCConfig(GradientMatchingConfig):
    """DC: gradient matching without augmentation."""


# --- per-class gradients ----------------------------------------------------------------------------


def _matched_names(net: nn.Module) -> list[str]:
    """Parameters the distance reads: weight tensors of ndim > 1."""
    return [name for name, param in net.named_parameters() if param.ndim > 1]


def _split_params(net: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(matched, others): detached views of the current parameters, plus buffers in `others`."""
    matched_names = set(_matched_names(net))
    matched, others = {}, {}
    for name, param in net.named_parameters():
        (matched if name in matched_names else others)[name] = param.detach()
    for name, buffer in net.named_buffers():
        others[name] = buffer
    return matched, others


def _class_gradients_batched(
    net: nn.Module, matched: dict[str, Tensor], others: dict[str, Tensor], images: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """{name: (K, *shape)} gradients of each class's mean CE, via vmap over the class axis of grad."""

    def class_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, {**params, **others}, (x,)), y)

    return vmap(grad(class_loss), in_dims=(None, 0, 0))(matched, images, labels)


def _class_gradients_loop(
    net: nn.Module, matched: dict[str, Tensor], others: dict[str, Tensor], images: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """Same as `_class_gradients_batched`, one class at a time (fallback)."""
    create_graph = torch.is_grad_enabled()  # off for the real side, which is a constant target
    leaves = {name: value.detach().requires_grad_(True) for name, value in matched.items()}
    per_class: list[tuple[Tensor, ...]] = []
    for c in range(images.shape[0]):
        with torch.enable_grad():
            logits = functional_call(net, {**leaves, **others}, (images[c],))
            loss = F.cross_entropy(logits, labels[c])
            per_class.append(torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph))
    return {name: torch.stack([g[i] for g in per_class]) for i, name in enumerate(leaves)}


class ClassGradients:
    """Per-class parameter gradients, batched by default; falls back to a loop once if batching fails."""

    def __init__(self, batched: bool = True) -> None:
        self.batched = batched

    def __call__(self, net: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """images (K, n, C, H, W), labels (K, n) -> {name: (K, *param shape)} for weights of ndim > 1."""
        matched, others = _split_params(net)
        if self.batched:
            try:
                return _class_gradients_batched(net, matched, others, images, labels)
            except (RuntimeError, NotImplementedError) as error:
                logger.warning("batched per-class gradients failed (%s); looping over classes", error)
                self.batched = False
        return _class_gradients_loop(net, matched, others, images, labels)


def matching_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    class_gradients: ClassGradients | None = None,
) -> Tensor:
    """Sum over classes of DC's gradient distance; differentiable wrt `syn_images`.

    real_images (K, n_real, C, H, W), syn_images (K, ipc, C, H, W); slice c holds class c.
    """
    class_gradients = class_gradients or ClassGradients()
    num_classes = real_images.shape[0]
    device = real_images.device
    labels_real = torch.arange(num_classes, device=device).view(-1, 1).expand(-1, real_images.shape[1])
    labels_syn = torch.arange(num_classes, device=device).view(-1, 1).expand(-1, syn_images.shape[1])
    with torch.no_grad():  # the real side is a constant target
        grads_real = class_gradients(net, real_images, labels_real)
    grads_syn = class_gradients(net, syn_images, labels_syn)
    names = list(grads_real)
    return common.gradient_distance(
        [grads_syn[name] for name in names], [grads_real[name] for name in names], leading=1
    )


def debiased_matching_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    aligned_images: Tensor,
    repulsion: float,
    valid: Tensor | None = None,
    class_gradients: ClassGradients | None = None,
) -> Tensor:
    """sum_c D(g_S, g_g) - lambda * D(g_S, g_b), D = DC's gradient distance; differentiable wrt syn.

    g_g: per-class gradient on `real_images` (the debiased target A_g), g_b: on `aligned_images` (the
    bias-aligned estimate A_b); all (K, n, C, H, W). Why this form: D sums 1 - cos over the R output rows
    of the matched weights, so each class's repulsion lies in [0, 2R]: the loss is bounded below by
    -2 lambda R K whatever lambda, and, being a cosine, the term cannot push the synthetic images'
    gradient scale (or the images) off to infinity; it only turns g_S away from the bias direction.
    `valid` (K,) bool drops the repulsion of classes without an aligned estimate.
    """
    class_gradients = class_gradients or ClassGradients()
    num_classes = real_images.shape[0]
    device = real_images.device
    labels_real = torch.arange(num_classes, device=device).view(-1, 1).expand(-1, real_images.shape[1])
    labels_aligned = torch.arange(num_classes, device=device).view(-1, 1).expand(-1, aligned_images.shape[1])
    labels_syn = torch.arange(num_classes, device=device).view(-1, 1).expand(-1, syn_images.shape[1])
    with torch.no_grad():  # the real sides are constant targets
        grads_real = class_gradients(net, real_images, labels_real)
        grads_aligned = class_gradients(net, aligned_images, labels_aligned)
    grads_syn = class_gradients(net, syn_images, labels_syn)
    names = list(grads_real)
    syn_list = [grads_syn[name] for name in names]
    attraction = common.gradient_distance_per_class(syn_list, [grads_real[name] for name in names])
    repelled = common.gradient_distance_per_class(syn_list, [grads_aligned[name] for name in names])
    if valid is not None:
        repelled = repelled * valid.to(repelled.dtype)
    return (attraction - repulsion * repelled).sum()


# --- network updates on the synthetic set -----------------------------------------------------------


def train_network(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    dsa: DSAConfig | None,
) -> None:
    """`epochs` epochs of SGD on (images, labels), shuffled by `generator` (reference `epoch('train')`,
    whose DataLoader keeps the last short batch); per-sample DSA when `dsa` is given."""
    count = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator, device=generator.device)
        order = order.to(images.device, non_blocking=True)
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            inputs = images[batch]
            if dsa is not None:
                inputs = dsa_augment(inputs, dsa, generator)
            loss = F.cross_entropy(net(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


# --- the shared DC / DSA loop -----------------------------------------------------------------------


def run_gradient_matching(
    real_images: Tensor,
    real_labels: Tensor,
    num_classes: int,
    cfg: GradientMatchingConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    dsa: DSAConfig | None,
    resume: dict | None,
    on_checkpoint: Callable[[dict], None] | None,
    checkpoint_every: int,
    progress: bool,
    desc: str,
    batched: bool | None = None,
    debias: common.DebiasTargets | None = None,
) -> common.DistillResult:
    """DC's outer/inner loop; with `dsa`, siamese augmentation in matching and per-sample augmentation
    in the network updates (DSA). Loss per outer iteration: the mean per-class distance over the outer
    loop (the reference's logged `loss_avg`), including the repulsion term when `debias.repulsion` > 0.
    `debias=None` is the plain method; the network updates always train on the synthetic set only.

    `batched=None` batches the per-class gradients (vmap; one grouped convolution) on accelerators and
    loops over classes on the CPU, where grouped convolutions measured 2-10x slower than the loop
    (same maths: tests/test_distill.py checks both paths against a per-class reference).
    """
    if batched is None:
        batched = real_images.device.type != "cpu"
    common.check_inputs(real_images, real_labels, num_classes)
    sampler = common.ClassSampler(real_labels, num_classes)
    sampling = common.real_sampling(sampler, real_labels, num_classes, debias)
    shape = real_images.shape[1:]
    ipc, batch_real = cfg.ipc, cfg.batch_real
    device = real_images.device

    syn = common.init_synthetic(real_images, sampling.init, ipc, cfg.init, generator).requires_grad_(True)
    syn_labels = common.class_labels(num_classes, ipc, device)
    real_batch_labels = common.class_labels(num_classes, batch_real, device)
    if sampling.aligned is None:
        groups = torch.cat([real_batch_labels, syn_labels])  # siamese: one parameter set per class
    else:  # the aligned batch shares its class's augmentation parameters too
        groups = torch.cat([real_batch_labels, real_batch_labels, syn_labels])
    optimizer_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)
    networks = common.FreshNetworks(net_factory, generator)
    class_gradients = ClassGradients(batched)

    start, log = 0, common.LossLog()
    if resume is not None:
        start, log = common.restore_state(resume, syn, optimizer_img, generator, cfg.iterations)

    bar = common.progress_bar(start, cfg.iterations, desc, progress)
    for iteration in bar:
        net = networks.next(generator)
        net.train()
        optimizer_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        loss_sum = torch.zeros((), device=device, dtype=real_images.dtype)
        for step in range(cfg.outer_loop):
            real = real_images[sampling.target.sample(batch_real, generator)]  # (K * batch_real, C, H, W)
            syn_in = syn
            if sampling.aligned is None:
                if dsa is not None:
                    augmented = dsa_augment(torch.cat([real, syn]), dsa, generator, groups=groups)
                    real, syn_in = augmented[: real.shape[0]], augmented[real.shape[0] :]
                loss = matching_loss(
                    net,
                    real.view(num_classes, batch_real, *shape),
                    syn_in.view(num_classes, ipc, *shape),
                    class_gradients,
                )
            else:
                aligned = real_images[sampling.aligned.sample(batch_real, generator)]
                if dsa is not None:
                    augmented = dsa_augment(torch.cat([real, aligned, syn]), dsa, generator, groups=groups)
                    real, aligned, syn_in = augmented.split([real.shape[0], aligned.shape[0], syn.shape[0]])
                loss = debiased_matching_loss(
                    net,
                    real.view(num_classes, batch_real, *shape),
                    syn_in.view(num_classes, ipc, *shape),
                    aligned.view(num_classes, batch_real, *shape),
                    sampling.repulsion,
                    sampling.aligned_valid,
                    class_gradients,
                )
            optimizer_img.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_img.step()
            loss_sum += loss.detach()
            if step == cfg.outer_loop - 1:
                break
            train_network(
                net, optimizer_net, syn.detach(), syn_labels, cfg.inner_loop, cfg.batch_train, generator, dsa
            )
        log.append(loss_sum / (num_classes * cfg.outer_loop))
        common.update_progress(bar, iteration, log)
        common.maybe_checkpoint(
            iteration + 1, checkpoint_every, on_checkpoint, syn, optimizer_img, generator, log
        )
    return common.finish(syn, num_classes, ipc, log)


def distill(
    real_images: Tensor,
    real_labels: Tensor,
    num_classes: int,
    cfg: DCConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    dsa: DSAConfig | None = None,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    debias: common.DebiasTargets | None = None,
) -> common.DistillResult:
    """Distil with DC. DC uses no augmentation (PROTOCOL section 6): `dsa` is accepted so that every
    method shares one signature, and ignored. `debias`: debiased real-side targets (None = plain DC)."""
    if dsa is not None:
        logger.debug("dc: ignoring the DSA config (DC distils without augmentation)")
    return run_gradient_matching(
        real_images,
        real_labels,
        num_classes,
        cfg,
        net_factory,
        generator,
        None,
        resume,
        on_checkpoint,
        checkpoint_every,
        progress,
        desc="dc",
        debias=debias,
    )
