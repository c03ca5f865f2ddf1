"""Where a distillation's real images come from: per-class batches, uniform or weighted.

`ClassSampler` draws the reference's per-class real batches (without replacement where the class
allows); `WeightedClassSampler` draws with probability proportional to per-sample weights, which is how
debiased targets are realised (importance sampling; docs/protocol.md §9). `real_sampling` picks the
samplers one run uses. All random numbers come from the caller's `torch.Generator`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from biasdd.errors import ConfigError

logger = logging.getLogger(__name__)


class ClassSampler:
    """Draws `n` real indices per class in one batched call, without replacement when the class holds at
    least `n` images (the reference's `permutation(indices_class[c])[:n]`), with replacement otherwise.

    Per-class index lists are padded into one (K, max_count) table once; each draw ranks random keys
    (K, max_count) on the generator's device and gathers, so there is no Python loop over classes.
    """

    def __init__(self, labels: Tensor, num_classes: int) -> None:
        labels_cpu = labels.detach().cpu()
        counts = torch.bincount(labels_cpu, minlength=num_classes)
        if counts.numel() > num_classes:
            raise ValueError(f"labels: found label {int(labels_cpu.max())} >= num_classes={num_classes}")
        empty = [c for c in range(num_classes) if counts[c] == 0]
        if empty:
            raise ConfigError(
                f"training set: class(es) {empty} have no images; every class needs some "
                "(is `download.limit_train` too small?)"
            )
        self.num_classes = num_classes
        self.counts = counts  # (K,) on CPU
        max_count = int(counts.max())
        order = torch.argsort(labels_cpu, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        # Slot p of class c holds its p-th image; slots past a class's count repeat its last image and
        # are never drawn.
        position = torch.minimum(torch.arange(max_count).view(1, -1), (counts - 1).view(-1, 1))
        table = order[starts.view(-1, 1) + position]  # (K, max_count)
        self.table = table.to(labels.device)
        self.max_count = max_count

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(K * n,) indices into the real set, class 0's n first, then class 1's, ..."""
        gen_device = generator.device
        counts = self.counts.to(gen_device)
        keys = torch.rand(self.num_classes, self.max_count, generator=generator, device=gen_device)
        keys = keys.masked_fill(torch.arange(self.max_count, device=gen_device) >= counts.view(-1, 1), 2.0)
        if n <= self.max_count:
            positions = torch.topk(keys, n, dim=1, largest=False, sorted=True).indices  # (K, n)
        else:
            positions = torch.zeros(self.num_classes, n, dtype=torch.int64, device=gen_device)
        uniform = torch.rand(self.num_classes, n, generator=generator, device=gen_device)
        with_replacement = (uniform * counts.view(-1, 1)).to(torch.int64).clamp(max=self.max_count - 1)
        short = (counts < n).view(-1, 1)
        positions = torch.where(short, with_replacement, positions)
        positions = positions.to(self.table.device, non_blocking=True)
        return torch.gather(self.table, 1, positions).reshape(-1)

    def sample_distinct(self, n: int, generator: torch.Generator) -> Tensor:
        """What `init_synthetic` draws: `sample` (already without replacement where the class allows)."""
        return self.sample(n, generator)


class WeightedClassSampler:
    """Draws `n` real indices per class with probability proportional to a per-sample weight.

    The debiased real-side target of class c is the weighted mean over its images (of the embedding for
    DM, of the CE for DC/DSA). Drawing the batch i.i.d. with probability w_i / sum_c w (with replacement)
    and taking a plain mean is an unbiased estimate of that weighted mean (importance sampling), with far
    less variance than weighting a uniform batch: at bias ratio 0.95 a class of ~6000 images holds ~33
    images per conflicting group, so a uniform batch of 256 holds 0-2 of each, while a group-balanced
    draw holds ~26 of each. Sampling uses one (K, n) uniform draw and a per-class inverse CDF
    (`searchsorted`), so there is no Python loop over classes.

    Classes whose weights sum to 0 (e.g. no bias-aligned image when the weights mark aligned samples)
    fall back to uniform draws and are flagged False in `valid` (K,), so callers can mask their term.
    """

    def __init__(self, labels: Tensor, weights: Tensor, num_classes: int) -> None:
        if weights.shape != labels.shape:
            raise ValueError(
                f"weights: shape {tuple(weights.shape)} does not match labels {tuple(labels.shape)}"
            )
        weights_cpu = weights.detach().to("cpu", torch.float64)
        if not torch.isfinite(weights_cpu).all() or (weights_cpu < 0).any():
            raise ValueError("weights: every per-sample weight must be finite and >= 0")
        base = ClassSampler(labels, num_classes)
        self.num_classes = num_classes
        self.counts = base.counts
        self.max_count = base.max_count
        self.table = base.table  # (K, max_count) on the labels' device
        table_cpu = base.table.cpu()
        in_class = torch.arange(base.max_count).view(1, -1) < base.counts.view(-1, 1)  # (K, max_count)
        table_weights = torch.where(in_class, weights_cpu[table_cpu], torch.zeros((), dtype=torch.float64))
        totals = table_weights.sum(1)  # (K,)
        self.valid = totals > 0  # (K,) bool on CPU
        # A class without weight draws uniformly (its term is masked by the caller via `valid`).
        table_weights = torch.where(self.valid.view(-1, 1), table_weights, in_class.double())
        self.weights = table_weights  # (K, max_count) float64 on CPU, 0 on padding slots
        cdf = torch.cumsum(table_weights, 1) / table_weights.sum(1, keepdim=True)
        # Exactly 1 from the last weighted slot on, so a draw u < 1 never lands on a zero-weight slot.
        last = (torch.arange(base.max_count).view(1, -1) * (table_weights > 0)).amax(1, keepdim=True)
        self.cdf = torch.where(torch.arange(base.max_count).view(1, -1) >= last, 1.0, cdf)  # (K, max_count)
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self.cdf.to(device), self.weights.to(device))
        return self._on[device]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(K * n,) indices drawn with replacement, P(i) = w_i / sum of class(i)'s weights; class-major."""
        gen_device = generator.device
        cdf, _ = self._tables(gen_device)
        uniform = torch.rand(self.num_classes, n, generator=generator, device=gen_device, dtype=torch.float64)
        positions = torch.searchsorted(cdf, uniform, right=True).clamp_(max=self.max_count - 1)  # (K, n)
        positions = positions.to(self.table.device, non_blocking=True)
        return torch.gather(self.table, 1, positions).reshape(-1)

    def sample_distinct(self, n: int, generator: torch.Generator) -> Tensor:
        """(K * n,) indices without replacement (Efraimidis-Spirakis: the n smallest keys E_i / w_i with
        E_i ~ Exp(1)), for the synthetic init: duplicate init images would get identical updates forever
        under siamese augmentation. Classes with fewer than n weighted images draw with replacement."""
        gen_device = generator.device
        _, weights = self._tables(gen_device)
        uniform = torch.rand(self.num_classes, self.max_count, generator=generator, device=gen_device)
        exponential = -torch.log1p(-uniform.double())  # Exp(1), finite since uniform < 1
        keys = torch.where(weights > 0, exponential / weights, torch.full_like(weights, math.inf))
        short = ((weights > 0).sum(1) < n).view(-1, 1)  # (K, 1)
        with_replacement = self.sample(n, generator).view(self.num_classes, n).to(gen_device)
        if n <= self.max_count:
            positions = torch.topk(keys, n, dim=1, largest=False, sorted=True).indices  # (K, n)
            picked = torch.gather(self.table.to(gen_device), 1, positions)
        else:
            picked = with_replacement
        picked = torch.where(short, with_replacement, picked)
        return picked.to(self.table.device).reshape(-1)


Sampler = ClassSampler | WeightedClassSampler


@dataclass(frozen=True)
class DebiasTargets:
    """How the real side of a matching loss is debiased (built by `biasdd.distill.debias.debias_targets`).

    weights (N,) >= 0: per-sample weight of the unbiased target A_g within each class (only ratios within
        a class matter); None = uniform, i.e. today's target.
    aligned_weights (N,) >= 0: per-sample weight of the bias-aligned estimate A_b (labelled: 1 where
        attribute == label; inferred: the biased model's confidence); needed when `repulsion` > 0.
    repulsion: lambda in min_S D(S, A_g) - lambda D(S, A_b); 0 = no second term.
    max_shift: DM only; the repulsion stops acting once mu_S is (1 + max_shift) times as far from mu_b as
        mu_g is (see `dm.debiased_embedding_loss`), which keeps the loss bounded below.
    groups (N,) int64 in 0..K-1: each sample's (pseudo-)attribute for synchronized matching (FairDD): the
        loss of class c sums the method's distance to each group in c's real batch; None = one target.
    """

    weights: Tensor | None = None
    aligned_weights: Tensor | None = None
    repulsion: float = 0.0
    max_shift: float = 1.0
    groups: Tensor | None = None

    def __post_init__(self) -> None:
        # The values come from a validated `DebiasConfig`; only the invariant between fields is checked.
        if self.repulsion > 0 and self.aligned_weights is None:
            raise ValueError("debias: repulsion > 0 needs aligned_weights (the bias-aligned samples)")


def weights_uniform_per_class(weights: Tensor, labels: Tensor, num_classes: int) -> bool:
    """Whether every class's weights are all equal (exactly): then the weighted target is today's."""
    labels = labels.to(weights.device)
    fill_high = torch.full((num_classes,), -math.inf, dtype=weights.dtype, device=weights.device)
    high = fill_high.scatter_reduce(0, labels, weights, "amax")
    low = (-fill_high).scatter_reduce(0, labels, weights, "amin")
    present = torch.bincount(labels, minlength=num_classes) > 0
    return bool(torch.equal(high[present], low[present]))


@dataclass
class RealSampling:
    """The samplers one run uses: `target` for the real batch of A_g, `init` for the synthetic init,
    `aligned` for the batch of A_b (None without repulsion) with `aligned_valid` (K,) masking classes
    that have no aligned estimate; `groups` (N,) the group of each sample for synchronized matching."""

    target: Sampler
    init: Sampler
    aligned: WeightedClassSampler | None
    aligned_valid: Tensor | None
    repulsion: float
    max_shift: float
    groups: Tensor | None = None


def real_sampling(
    sampler: ClassSampler, labels: Tensor, num_classes: int, debias: DebiasTargets | None
) -> RealSampling:
    """Samplers for `debias`. Without debias, or with weights that are uniform within every class (e.g.
    `groups` on a perfectly balanced set), the target and init samplers ARE `sampler`, so the run draws
    exactly the same random numbers as the plain method (byte-identical when repulsion is 0 too).

    Decision: with weights, the synthetic init ("real") draws from the weighted sampler without
    replacement: at the quick budget DM moves little from its init, and a bias-aligned init would
    undo much of the debiasing.
    """
    if debias is None:
        return RealSampling(sampler, sampler, None, None, 0.0, 1.0)
    target: Sampler = sampler
    if debias.weights is not None and not weights_uniform_per_class(debias.weights, labels, num_classes):
        target = WeightedClassSampler(labels, debias.weights, num_classes)
    aligned, valid = None, None
    if debias.repulsion > 0:
        assert debias.aligned_weights is not None  # checked by DebiasTargets
        aligned = WeightedClassSampler(labels, debias.aligned_weights, num_classes)
        valid = aligned.valid.to(labels.device)
        if not bool(aligned.valid.all()):
            missing = [c for c in range(num_classes) if not bool(aligned.valid[c])]
            logger.warning(
                "debias: class(es) %s have no bias-aligned samples: no repulsion for them", missing
            )
    groups = None if debias.groups is None else debias.groups.to(labels.device).long()
    return RealSampling(
        target, target, aligned, valid, float(debias.repulsion), float(debias.max_shift), groups
    )
