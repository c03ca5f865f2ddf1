"""Dataset Condensation with Distribution Matching (DM; Zhao & Bilen 2023; reference `main_DM.py`).

What DM adds to the driver (docs/protocol.md §6): one image step per outer iteration on a fresh,
frozen network, matching per-class mean embeddings:
loss = sum_c || mean embed(aug(real_c)) - mean embed(aug(syn_c)) ||^2 (the driver applies the siamese
DSA). The real side is a constant target: embedded without a graph, in cache-sized chunks on the CPU
and through the compute settings (`biasdd.training.compute`); the synthetic side is one differentiable pass.

Debiased targets (docs/protocol.md §9): the real batch of class c is drawn by importance sampling from
the debiasing weights, so its plain mean embedding estimates the weighted mean mu_g; with a repulsion
lambda > 0 the driver also draws a bias-aligned batch, estimating mu_b, and the loss becomes
`debiased_embedding_loss`; with groups (FairDD), `synchronized_embedding_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasdd.distill.driver import Batch, Context, DistillConfig
from biasdd.training.compute import FP32, NetworkRunner


@dataclass(frozen=True)
class DMConfig(DistillConfig):
    """DM's params section: the driver's fields only (docs/protocol.md §6)."""

    SECTION: ClassVar[str] = "distill.dm"


def _means(embedded: Tensor, num_classes: int) -> Tensor:
    """(K * n, D) -> (K, D): per-class mean embedding of a class-major batch."""
    return embedded.view(num_classes, -1, embedded.shape[-1]).mean(1)


def embedding_loss(
    net: nn.Module, real_images: Tensor, syn_images: Tensor, runner: NetworkRunner | None = None
) -> Tensor:
    """sum_c || mean embed(real_c) - mean embed(syn_c) ||^2; differentiable wrt `syn_images` only.

    real_images (K, n_real, C, H, W), syn_images (K, ipc, C, H, W); slice c holds class c. `net` needs an
    `embed` method (features before the classifier).
    """
    runner = runner or NetworkRunner(net, FP32, real_images.device)
    num_classes = real_images.shape[0]
    with torch.no_grad():
        real_mean = _means(runner.embed_chunks(real_images.flatten(0, 1)), num_classes)
    syn_mean = _means(runner.embed(syn_images.flatten(0, 1)), num_classes)
    return ((real_mean - syn_mean) ** 2).sum()


def debiased_embedding_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    aligned_images: Tensor,
    repulsion: float,
    max_shift: float,
    valid: Tensor | None = None,
    runner: NetworkRunner | None = None,
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
    runner = runner or NetworkRunner(net, FP32, real_images.device)
    num_classes = real_images.shape[0]
    with torch.no_grad():
        both = torch.cat([real_images.flatten(0, 1), aligned_images.flatten(0, 1)])
        embedded = runner.embed_chunks(both)
        split = real_images.shape[0] * real_images.shape[1]
        real_mean = _means(embedded[:split], num_classes)
        aligned_mean = _means(embedded[split:], num_classes)
        cap = (1 + max_shift) ** 2 * ((real_mean - aligned_mean) ** 2).sum(1)  # (K,)
    syn_mean = _means(runner.embed(syn_images.flatten(0, 1)), num_classes)
    attraction = ((real_mean - syn_mean) ** 2).sum(1)  # (K,)
    repelled = torch.minimum(((aligned_mean - syn_mean) ** 2).sum(1), cap)  # (K,)
    if valid is not None:
        repelled = repelled * valid.to(repelled.dtype)
    return (attraction - repulsion * repelled).sum()


def synchronized_embedding_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    groups: Tensor,
    num_groups: int,
    runner: NetworkRunner | None = None,
) -> Tensor:
    """FairDD's synchronized DM (Zhou et al. 2025, `main_DM.py`): sum_c sum_{g in batch_c} ||mu_g - mu_S||^2.

    real_images (K, n, C, H, W) with `groups` (K, n) in 0..num_groups-1, syn_images (K, ipc, C, H, W);
    mu_g is the mean embedding of class c's real images of group g, over the groups present in the
    batch (each group weighs the same however few images it has), mu_S that of c's synthetic images.
    Differentiable wrt `syn_images` only.
    """
    runner = runner or NetworkRunner(net, FP32, real_images.device)
    num_classes, per_class = real_images.shape[:2]
    with torch.no_grad():
        embedded = runner.embed_chunks(real_images.flatten(0, 1))
        embedded = embedded.view(num_classes, per_class, -1)  # (K, n, D)
        one_hot = F.one_hot(groups.long(), num_groups).to(embedded.dtype)  # (K, n, G)
        counts = one_hot.sum(1)  # (K, G)
        group_means = torch.einsum("kng,knd->kgd", one_hot, embedded) / counts.clamp_min(1).unsqueeze(-1)
        present = (counts > 0).to(embedded.dtype)  # (K, G)
    syn_mean = _means(runner.embed(syn_images.flatten(0, 1)), num_classes)  # (K, D)
    distances = ((group_means - syn_mean.unsqueeze(1)) ** 2).sum(-1)  # (K, G)
    return (distances * present).sum()


class DistributionMatching:
    """DM's part of an outer iteration: one image step on the fresh network, frozen."""

    steps = 1

    def __init__(self, cfg: DMConfig, context: Context) -> None:
        self.context = context

    def start(self, runner: NetworkRunner) -> None:
        if not hasattr(runner.net, "embed"):
            raise ValueError(
                "net_factory: DM needs a network with an `embed` method (features before the head)"
            )
        runner.net.train()  # as the reference; ConvNet's instance norm has no train/eval difference
        runner.net.requires_grad_(False)

    def loss(self, runner: NetworkRunner, batch: Batch) -> Tensor:
        if batch.groups is not None:
            num_groups = self.context.num_classes  # (pseudo-)attributes share the classes' range
            return synchronized_embedding_loss(
                runner.net, batch.real, batch.syn, batch.groups, num_groups, runner
            )
        if batch.aligned is None:
            return embedding_loss(runner.net, batch.real, batch.syn, runner)
        sampling = self.context.sampling
        return debiased_embedding_loss(
            runner.net,
            batch.real,
            batch.syn,
            batch.aligned,
            sampling.repulsion,
            sampling.max_shift,
            sampling.aligned_valid,
            runner,
        )

    def between(self, runner: NetworkRunner, syn: Tensor) -> None:
        """Never called: one step per outer iteration."""
