"""Pieces shared by the distillation methods: result type, synthetic init, per-class sampling (uniform,
or weighted for debiased targets), the gradient-matching distance, network re-initialisation, checkpoint
state, loss log and progress bar.

Random numbers all come from the caller's `torch.Generator`, drawn on its device and moved to the
data's device; the generator's state plus the synthetic images and the image optimiser's state are the
whole state of a run, so a checkpoint of those resumes bit-identically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

INIT_CHOICES = ("noise", "real")
POSTFIX_EVERY = 25  # iterations between progress-bar loss updates (each one syncs the device once)
COSINE_EPS = 1e-6  # reference distance_wb


@dataclass
class DistillResult:
    """A distilled set: images (K * ipc, C, H, W) float32 on CPU in normalised space, labels (K * ipc,)
    int64 sorted by class, and one loss per outer iteration."""

    images: Tensor
    labels: Tensor
    losses: list[float] = field(default_factory=list)


# --- config checks ----------------------------------------------------------------------------------


def check_positive_ints(where: str, config: Any, names: Sequence[str]) -> None:
    """Raise ValueError naming the field unless every `names` field is an int >= 1."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}.{name}: {value!r} is not valid; expected an integer >= 1")


def check_optimiser(where: str, config: Any, lr_names: Sequence[str], momentum_names: Sequence[str]) -> None:
    """Raise ValueError naming the field unless learning rates are > 0 and momenta in [0, 1)."""
    for name in lr_names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{where}.{name}: {value!r} is not valid; expected a number > 0")
    for name in momentum_names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{where}.{name}: {value!r} is not valid; expected a number in [0, 1)")


def check_init(where: str, value: str) -> None:
    if value not in INIT_CHOICES:
        raise ValueError(f"{where}.init: {value!r} is not valid; choose one of {list(INIT_CHOICES)}")


# --- sampling and init ------------------------------------------------------------------------------


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
            raise ValueError(f"labels: class(es) {empty} have no real images; every class needs some")
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
    """How the real side of a matching loss is debiased (built by `biasdd.debias.debias_targets`).

    weights (N,) >= 0: per-sample weight of the unbiased target A_g within each class (only ratios within
        a class matter); None = uniform, i.e. today's target.
    aligned_weights (N,) >= 0: per-sample weight of the bias-aligned estimate A_b (labelled: 1 where
        attribute == label; inferred: the biased model's confidence); needed when `repulsion` > 0.
    repulsion: lambda in min_S D(S, A_g) - lambda D(S, A_b); 0 = no second term.
    max_shift: DM only; the repulsion stops acting once mu_S is (1 + max_shift) times as far from mu_b as
        mu_g is (see `dm.debiased_embedding_loss`), which keeps the loss bounded below.
    """

    weights: Tensor | None = None
    aligned_weights: Tensor | None = None
    repulsion: float = 0.0
    max_shift: float = 1.0

    def __post_init__(self) -> None:
        if not (
            isinstance(self.repulsion, (int, float)) and math.isfinite(self.repulsion) and self.repulsion >= 0
        ):
            raise ValueError(f"debias.repulsion: {self.repulsion!r} is not valid; expected a number >= 0")
        if not (
            isinstance(self.max_shift, (int, float)) and math.isfinite(self.max_shift) and self.max_shift > 0
        ):
            raise ValueError(f"debias.max_shift: {self.max_shift!r} is not valid; expected a number > 0")
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
    that have no aligned estimate."""

    target: Sampler
    init: Sampler
    aligned: WeightedClassSampler | None
    aligned_valid: Tensor | None
    repulsion: float
    max_shift: float


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
    return RealSampling(target, target, aligned, valid, float(debias.repulsion), float(debias.max_shift))


def class_labels(num_classes: int, per_class: int, device: torch.device | str) -> Tensor:
    """(K * per_class,) int64: [0] * per_class + [1] * per_class + ..."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def init_synthetic(
    real_images: Tensor,
    sampler: ClassSampler | WeightedClassSampler,
    ipc: int,
    init: str,
    generator: torch.Generator,
) -> Tensor:
    """(K * ipc, C, H, W) synthetic images sorted by class: N(0, 1) noise (in normalised space) or
    random real images of each class (distinct where the class allows)."""
    num_images = sampler.num_classes * ipc
    if init == "noise":
        shape = (num_images, *real_images.shape[1:])
        noise = torch.randn(shape, generator=generator, device=generator.device)
        return noise.to(device=real_images.device, dtype=real_images.dtype)
    check_init("distill", init)
    return real_images[sampler.sample_distinct(ipc, generator)].detach().clone()


# --- gradient matching (DC / DSA) -------------------------------------------------------------------


def gradient_distance(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor], leading: int = 0) -> Tensor:
    """DC's layer-wise distance (PROTOCOL section 6; reference `match_loss` with `distance_wb`).

    Sum over weight tensors of ndim > 1 (biases and norm parameters are ignored) of the sum over output
    rows of 1 - cos(g_real_row, g_syn_row); a conv weight (out, in, h, w) is read as `out` rows of
    in * h * w. `leading` batch dimensions (e.g. 1 for a class axis) are summed over too.
    """
    total: Tensor | None = None
    for g_syn, g_real in zip(grads_syn, grads_real, strict=True):
        if g_real.ndim - leading <= 1:
            continue
        rows_syn = g_syn.flatten(leading + 1)  # (*leading, out, in*h*w)
        rows_real = g_real.flatten(leading + 1)
        dot = (rows_syn * rows_real).sum(-1)
        norms = rows_syn.norm(dim=-1) * rows_real.norm(dim=-1)
        term = (1 - dot / (norms + COSINE_EPS)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("gradient_distance: the network has no weight tensor with ndim > 1 to match")
    return total


def gradient_distance_per_class(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor]) -> Tensor:
    """`gradient_distance` with one leading class axis, kept: (K,) distances, each in [0, 2 * rows]
    (rows = output units summed over the weight tensors). Used for the masked repulsion term."""
    total: Tensor | None = None
    for g_syn, g_real in zip(grads_syn, grads_real, strict=True):
        if g_real.ndim <= 2:
            continue
        rows_syn = g_syn.flatten(2)  # (K, out, in*h*w)
        rows_real = g_real.flatten(2)
        dot = (rows_syn * rows_real).sum(-1)
        norms = rows_syn.norm(dim=-1) * rows_real.norm(dim=-1)
        term = (1 - dot / (norms + COSINE_EPS)).sum(-1)  # (K,)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("gradient_distance: the network has no weight tensor with ndim > 1 to match")
    return total


# --- networks ---------------------------------------------------------------------------------------

_REINIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def can_reinitialise(net: nn.Module) -> bool:
    """Whether `reinitialise_` knows every parametrised module of `net`."""
    for module in net.modules():
        if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _REINIT_TYPES):
            return False
    return True


@torch.no_grad()
def reinitialise_(net: nn.Module, generator: torch.Generator) -> None:
    """Re-draw `net`'s parameters in place from `generator` with torch's default init distribution.

    Conv and linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what kaiming_uniform_ with
    a = sqrt(5) gives); norm layers: weight 1, bias 0. Cheaper than building a new module every
    iteration, and no global RNG is touched. Buffers (e.g. batch-norm running stats) are reset too.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            for param in (module.weight, module.bias):
                if param is None:
                    continue
                draw = torch.rand(param.shape, generator=generator, device=generator.device)
                draw = draw.to(device=param.device, dtype=param.dtype, non_blocking=True)
                param.copy_(draw * (2 * bound) - bound)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class FreshNetworks:
    """A freshly initialised network per outer iteration, drawn from the generator.

    Builds one network with `net_factory` and re-draws its parameters in place each time when every
    module is known (see `reinitialise_`); otherwise calls `net_factory` every time.
    """

    def __init__(self, net_factory: Callable[[torch.Generator], nn.Module], generator: torch.Generator):
        self.net_factory = net_factory
        self.net = net_factory(generator)
        self.in_place = can_reinitialise(self.net)
        if not self.in_place:
            logger.info("network has modules reinitialise_ does not know: building a new one per iteration")

    def next(self, generator: torch.Generator) -> nn.Module:
        if self.in_place:
            reinitialise_(self.net, generator)
        else:
            self.net = self.net_factory(generator)
        return self.net


# --- checkpoint state, losses, progress -------------------------------------------------------------


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class LossLog:
    """One loss per outer iteration, kept on the device and converted only when asked."""

    def __init__(self, done: Sequence[float] = ()) -> None:
        self.done = [float(v) for v in done]
        self.pending: list[Tensor] = []

    def append(self, loss: Tensor) -> None:
        self.pending.append(loss.detach().reshape(()))

    def values(self) -> list[float]:
        if self.pending:
            self.done.extend(torch.stack(self.pending).double().cpu().tolist())
            self.pending = []
        return list(self.done)

    def latest(self) -> float | None:
        if self.pending:
            return float(self.pending[-1])
        return self.done[-1] if self.done else None


def checkpoint_state(
    iteration: int, images: Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator, log: LossLog
) -> dict[str, Any]:
    """A self-contained snapshot (CPU copies) of a run after `iteration` completed outer iterations."""
    return {
        "iteration": iteration,
        "images": images.detach().to("cpu", copy=True),
        "optimizer": _to_cpu(optimizer.state_dict()),
        "generator": generator.get_state(),
        "losses": log.values(),
    }


def restore_state(
    state: Mapping[str, Any],
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    iterations: int,
) -> tuple[int, LossLog]:
    """Load a `checkpoint_state` snapshot into the live objects; returns (start iteration, loss log)."""
    missing = sorted({"iteration", "images", "optimizer", "generator", "losses"} - set(state))
    if missing:
        raise KeyError(f"resume: checkpoint state lacks {missing}")
    start = int(state["iteration"])
    if not 0 <= start <= iterations:
        raise ValueError(f"resume: iteration {start} is outside [0, {iterations}]")
    if tuple(state["images"].shape) != tuple(images.shape):
        raise ValueError(
            f"resume: images of shape {tuple(state['images'].shape)} do not fit {tuple(images.shape)}"
        )
    with torch.no_grad():
        images.copy_(state["images"].to(device=images.device, dtype=images.dtype))
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"].cpu())
    return start, LossLog(state["losses"])


def progress_bar(start: int, total: int, desc: str, enabled: bool) -> Iterator[int] | Any:
    """A tqdm over outer iterations that switches itself off without a terminal (`disable=None`)."""
    return tqdm(range(start, total), initial=start, total=total, desc=desc, disable=None if enabled else True)


def update_progress(bar: Any, iteration: int, log: LossLog) -> None:
    """Show the latest loss every POSTFIX_EVERY iterations (one device sync each time), if shown."""
    if getattr(bar, "disable", True) or iteration % POSTFIX_EVERY:
        return
    latest = log.latest()
    if latest is not None:
        bar.set_postfix(loss=f"{latest:.4f}", refresh=False)


def finish(images: Tensor, num_classes: int, ipc: int, log: LossLog) -> DistillResult:
    return DistillResult(
        images=images.detach().to("cpu", dtype=torch.float32, copy=True),
        labels=class_labels(num_classes, ipc, "cpu"),
        losses=log.values(),
    )


def maybe_checkpoint(
    iteration_done: int,
    checkpoint_every: int,
    on_checkpoint: Callable[[dict], None] | None,
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    log: LossLog,
) -> None:
    """Call `on_checkpoint` after every `checkpoint_every` completed outer iterations."""
    if on_checkpoint is None or checkpoint_every <= 0 or iteration_done % checkpoint_every:
        return
    on_checkpoint(checkpoint_state(iteration_done, images, optimizer, generator, log))


def check_inputs(real_images: Tensor, real_labels: Tensor, num_classes: int) -> None:
    if real_images.ndim != 4:
        raise ValueError(f"real_images: expected (N, C, H, W), got shape {tuple(real_images.shape)}")
    if real_labels.shape != real_images.shape[:1]:
        raise ValueError(
            f"real_labels: shape {tuple(real_labels.shape)} does not match {real_images.shape[0]} images"
        )
    if real_labels.dtype != torch.int64:
        raise ValueError(f"real_labels: expected int64, got {real_labels.dtype}")
    if real_labels.device != real_images.device:
        raise ValueError(f"real_labels on {real_labels.device} but real_images on {real_images.device}")
    if num_classes < 1:
        raise ValueError(f"num_classes: {num_classes!r} must be >= 1")
