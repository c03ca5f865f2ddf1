"""Evaluation: train fresh networks on a (synthetic or full) training set, then score them per group.

PROTOCOL section 7. A synthetic set of 500 images is only 2 batches per epoch, so training one
network at a time is bound by per-launch overhead (PERFORMANCE.md: ~25 ms per epoch with the
reference). Here the R repeats are trained AT ONCE: their parameters are stacked
(`torch.func.stack_module_state`) and one `vmap`-ed `functional_call` runs all R forwards on an
(R, B, C, H, W) batch, with one backward pass and one optimiser step over the stacked tensors.

Each network still has its own init, data order and augmentation, drawn from its own generator in the
same order as a plain sequential loop would draw them (init, then per epoch one permutation, then
per batch one augmentation call), so batched training equals sequential training up to float
round-off (checked in `tests/test_evaluate.py`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# (B, C, H, W) -> (B, C, H, W); all randomness drawn from the generator.
Augment = Callable[[Tensor, torch.Generator], Tensor]

METRICS = ("accuracy", "aligned_accuracy", "conflicting_accuracy", "worst_group_accuracy", "n")


@dataclass(frozen=True)
class TrainConfig:
    """SGD training of an evaluation network (PROTOCOL section 7; values come from `params.yaml`).

    Epoch e trains at `lr * lr_gamma ** (number of milestones <= e)`, and the momentum buffer is reset
    at each milestone (the reference re-creates the optimiser: `epoch_eval_train` in Zhao & Bilen's
    DatasetCondensation `utils.py`). Note the reference loops over `Epoch + 1` epochs and decays after
    epoch `Epoch // 2`; here `epochs` is the exact count and milestone m is the first decayed epoch
    (the `MultiStepLR` convention), so 1000 epochs with milestone 500 give 500 + 500.
    """

    epochs: int  # 1000 synthetic / 150 full set
    lr: float  # 0.01
    momentum: float  # 0.9
    weight_decay: float  # 5e-4
    batch_size: int  # 256
    lr_milestones: tuple[int, ...]  # (500,) synthetic; (50, 100) full set
    lr_gamma: float  # 0.1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {value!r} is not valid; expected an integer >= 1")
        for name, low, high, low_open, high_open in (
            ("lr", 0.0, math.inf, True, True),
            ("momentum", 0.0, 1.0, False, True),
            ("weight_decay", 0.0, math.inf, False, True),
            ("lr_gamma", 0.0, 1.0, True, False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                ok = (value > low if low_open else value >= low) and (
                    value < high if high_open else value <= high
                )
            if not ok:
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"{name}: {value!r} is not valid; expected a number in {interval}")
        milestones = self.lr_milestones
        if not isinstance(milestones, (tuple, list)) or not all(
            isinstance(m, int) and not isinstance(m, bool) for m in milestones
        ):
            raise ValueError(f"lr_milestones: {milestones!r} is not valid; expected a list of integers")
        object.__setattr__(self, "lr_milestones", tuple(milestones))
        if any(b <= a for a, b in zip(milestones[:-1], milestones[1:], strict=True)):
            raise ValueError(f"lr_milestones: {list(milestones)} must be strictly increasing")
        if any(m < 1 or m >= self.epochs for m in milestones):
            # A milestone outside 1..epochs-1 would silently never fire (e.g. a shortened budget
            # that forgot to shorten its milestones), so fail loudly instead.
            raise ValueError(
                f"lr_milestones: {list(milestones)} must lie in [1, epochs - 1] = [1, {self.epochs - 1}]"
            )


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """The learning rate used during `epoch` (0-based): lr times gamma per milestone already reached."""
    return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


@dataclass
class NetworkEnsemble:
    """R networks of one architecture, held as stacked parameters and buffers.

    `params[name]` and `buffers[name]` have a leading dimension R; `base` is a parameter-free copy of
    the architecture (on the meta device) that `functional_call` runs with them.
    """

    base: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    train_loss: Tensor | None = None  # (R,) mean training loss of the last epoch, if trained here

    @property
    def num_networks(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (images,))

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """Eval-mode logits of every network on the same images: (N, C, H, W) -> (R, N, K)."""
        was_training = self.base.training
        self.base.eval()
        try:
            params = {k: v.detach() for k, v in self.params.items()}
            if self.device.type == "cpu":  # grouped convolutions are slow on the CPU: one net at a time

                def run_all(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
                    return torch.stack(
                        [
                            self._call({k: v[r] for k, v in p.items()}, {k: v[r] for k, v in b.items()}, x)
                            for r in range(self.num_networks)
                        ]
                    )
            else:
                run_all = torch.func.vmap(self._call, in_dims=(0, 0, None))
            chunks = [
                run_all(params, self.buffers, images[start : start + batch_size].to(self.device))
                for start in range(0, images.shape[0], batch_size)
            ]
        finally:
            self.base.train(was_training)
        return torch.cat(chunks, dim=1)  # (R, N, K)

    def predict(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """Top-1 predictions of every network, (R, N) int64, in eval mode without gradients."""
        return self.logits(images, batch_size).argmax(dim=-1)

    def unstack(self) -> list[nn.Module]:
        """The R networks as ordinary modules (copies, on the ensemble's device)."""
        modules = []
        for r in range(self.num_networks):
            module = copy.deepcopy(self.base).to_empty(device=self.device)
            with torch.no_grad():
                for name, value in self.params.items():
                    module.get_parameter(name).copy_(value[r])
                for name, value in self.buffers.items():
                    module.get_buffer(name).copy_(value[r])
            modules.append(module)
        return modules


def _draw_permutations(
    num_samples: int, generators: Sequence[torch.Generator], device: torch.device
) -> Tensor:
    """One random order of the training set per network, (R, N) int64 on `device`."""
    perms = [torch.randperm(num_samples, generator=g, device=g.device) for g in generators]
    return torch.stack([p.to(device, non_blocking=True) for p in perms])


def train_networks(
    images: Tensor,
    labels: Tensor,
    net_factory: Callable[[torch.Generator], nn.Module],
    cfg: TrainConfig,
    generators: list[torch.Generator],
    augment: Augment | None = None,
    progress: bool = True,
    log_every: int = 50,
    compile_forward: bool = False,
    batched: bool | None = None,
) -> NetworkEnsemble:
    """Train R = len(generators) fresh networks on (images, labels) at once; PROTOCOL section 7.

    `images` is (N, C, H, W) shared by all networks, or (R, N, C, H, W) with `labels` (R, N): one
    training set per network (each evaluation repeat on its own distillation).
    `batched=None` trains the R networks at once on accelerators and one after the other on the CPU,
    where the vmapped (grouped) convolutions measured ~2x slower per network than R separate runs; both
    give the same networks (each draws from its own generator in the same order; tested).

    Network r is `net_factory(generators[r])`, sees the data in its own random order each epoch
    (a permutation drawn from `generators[r]`) and gets its own augmentation
    (`augment(batch, generators[r])`, one call per network and batch). Every network sees all N
    samples per epoch in ceil(N / batch_size) batches, the last one partial (the reference's
    DataLoader with shuffle=True, drop_last=False).

    The loss is the sum over networks of each network's mean cross-entropy, so the gradient of each
    network's stacked slice is exactly its own; SGD with momentum and weight decay is elementwise, so
    one optimiser over the stacked tensors equals R separate ones. The optimiser is re-created at each
    milestone (lr times gamma, momentum reset), as the reference does.

    Training runs on `images.device`; the data stays there as one tensor and only the (R, B) batch is
    gathered per step. Models with buffers that change in training (batch norm running stats) are not
    supported under `vmap`; ConvNet uses instance norm and has none.
    `log_every`: epochs between loss read-outs for the progress bar (each read-out is one host sync).
    `compile_forward`: run the vmapped forward through `torch.compile` (off by default; it fuses
    norm + ReLU + pool, at a one-off compile cost of tens of seconds, and compiles twice when the last
    batch is partial).
    """
    if len(generators) < 1:
        raise ValueError("generators: need at least one generator (one per network)")
    per_network = images.dim() == 5
    if per_network and (images.shape[0] != len(generators) or labels.shape[:1] != images.shape[:1]):
        raise ValueError(
            f"per-network sets: images {tuple(images.shape)} and labels {tuple(labels.shape)} need a "
            f"leading dimension R = {len(generators)} (one per generator)"
        )
    sample_dim = 1 if per_network else 0
    if images.shape[sample_dim] != labels.shape[-1]:
        raise ValueError(f"images and labels disagree on N: {images.shape[sample_dim]} vs {labels.shape[-1]}")
    if images.shape[sample_dim] < 1:
        raise ValueError("images: the training set is empty")
    if batched is None:
        batched = images.device.type != "cpu"
    if not batched and len(generators) > 1:
        parts = [
            train_networks(
                images[r] if per_network else images,
                labels[r] if per_network else labels,
                net_factory,
                cfg,
                [generator],
                augment=augment,
                progress=progress,
                log_every=log_every,
                compile_forward=compile_forward,
                batched=True,
            )
            for r, generator in enumerate(generators)
        ]
        return NetworkEnsemble(
            base=parts[0].base,
            params={k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params},
            buffers={k: torch.cat([p.buffers[k] for p in parts]) for k in parts[0].buffers},
            train_loss=torch.cat([p.train_loss for p in parts]),  # type: ignore[misc]
        )
    device = images.device
    labels = labels.to(device=device, dtype=torch.long)
    num_samples = images.shape[sample_dim]
    num_networks = len(generators)
    net_index = torch.arange(num_networks, device=device)[:, None]  # (R, 1) picks each net's own set

    nets = [net_factory(g).to(device) for g in generators]
    params, buffers = stack_module_state(nets)  # each (R, ...); params are fresh leaves
    base = copy.deepcopy(nets[0]).to("meta")
    del nets
    base.train()

    def forward_one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))

    forward_all = torch.func.vmap(forward_one)  # (R, B, C, H, W) -> (R, B, K)
    if compile_forward:
        forward_all = torch.compile(forward_all)
    stacked = list(params.values())

    def make_optimizer(epoch: int) -> torch.optim.SGD:
        return torch.optim.SGD(
            stacked, lr=lr_at(epoch, cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    optimizer = make_optimizer(0)
    milestones = set(cfg.lr_milestones)
    bounds = [(s, min(s + cfg.batch_size, num_samples)) for s in range(0, num_samples, cfg.batch_size)]
    epoch_loss = torch.zeros(num_networks, device=device)

    bar = tqdm(range(cfg.epochs), desc="train eval nets", disable=None if progress else True, leave=False)
    for epoch in bar:
        if epoch in milestones:
            optimizer = make_optimizer(epoch)  # new lr, momentum buffers reset (the reference)
        perms = _draw_permutations(num_samples, generators, device)  # (R, N)
        epoch_loss.zero_()
        for start, end in bounds:
            index = perms[:, start:end]  # (R, B)
            batch = images[net_index, index] if per_network else images[index]  # (R, B, C, H, W)
            if augment is not None:
                with torch.no_grad():
                    batch = torch.stack([augment(batch[r], generators[r]) for r in range(num_networks)])
            target = labels[net_index, index] if per_network else labels[index]  # (R, B)
            logits = forward_all(params, buffers, batch)  # (R, B, K)
            per_net = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            per_net = per_net.view(num_networks, end - start).mean(dim=1)  # (R,) each net's mean CE
            optimizer.zero_grad(set_to_none=True)
            per_net.sum().backward()
            optimizer.step()
            epoch_loss += per_net.detach()
        if not bar.disable and (epoch % log_every == 0 or epoch == cfg.epochs - 1):
            bar.set_postfix(loss=f"{(epoch_loss / len(bounds)).mean().item():.4f}")  # one sync
    bar.close()

    train_loss = epoch_loss / len(bounds)
    return NetworkEnsemble(
        base=base,
        params={k: v.detach() for k, v in params.items()},
        buffers=dict(buffers),
        train_loss=train_loss,
    )


def group_metrics(
    pred: Tensor, labels: Tensor, attributes: Tensor, num_classes: int
) -> dict[str, float | None]:
    """Top-1 accuracy overall, on bias-aligned (attribute == label) and bias-conflicting samples, and
    on the worst (class, attribute) group that has samples; PROTOCOL section 7.

    A subset with no samples (e.g. no aligned samples in `test_conflicting`) gives None, not NaN, since
    the result goes into JSON. `n` is the number of samples.
    """
    if not (pred.shape == labels.shape == attributes.shape) or pred.dim() != 1:
        raise ValueError(
            f"pred, labels, attributes must be 1-d of one length; got {tuple(pred.shape)}, "
            f"{tuple(labels.shape)}, {tuple(attributes.shape)}"
        )
    labels = labels.to(pred.device, torch.long)
    attributes = attributes.to(pred.device, torch.long)
    num_samples = pred.shape[0]
    both = torch.cat([labels, attributes])
    if num_samples and (int(both.min()) < 0 or int(both.max()) >= num_classes):
        raise ValueError(f"labels and attributes must lie in 0..{num_classes - 1}")
    correct = (pred == labels).double()
    aligned = attributes == labels

    def mean_or_none(mask: Tensor) -> float | None:
        count = int(mask.sum())
        return float(correct[mask].sum()) / count if count else None

    group = labels * num_classes + attributes  # (N,) group id of (class, attribute)
    counts = torch.bincount(group, minlength=num_classes**2)
    hits = torch.bincount(group, weights=correct, minlength=num_classes**2)
    present = counts > 0
    group_acc = hits[present] / counts[present]
    return {
        "accuracy": float(correct.mean()) if num_samples else None,
        "aligned_accuracy": mean_or_none(aligned),
        "conflicting_accuracy": mean_or_none(~aligned),
        "worst_group_accuracy": float(group_acc.min()) if num_samples else None,
        "n": num_samples,
    }


def summarise(per_repeat: list[dict[str, float | None]]) -> dict[str, dict[str, float | list | None]]:
    """Mean and std of every metric over repeats: {key: {"mean", "std", "values"}}.

    std is the population std (numpy's default ddof=0), as the reference code reports `np.std`; one
    repeat gives std 0.0. None values (a subset without samples) are kept in `values` but skipped in
    mean and std; if all are None, mean and std are None.
    """
    keys: list[str] = []
    for metrics in per_repeat:
        keys.extend(k for k in metrics if k not in keys)
    summary: dict[str, dict[str, float | list | None]] = {}
    for key in keys:
        values = [metrics.get(key) for metrics in per_repeat]
        present = np.asarray([v for v in values if v is not None], dtype=np.float64)
        summary[key] = {
            "mean": float(present.mean()) if present.size else None,
            "std": float(present.std()) if present.size else None,
            "values": values,
        }
    return summary


def evaluate_ensemble(
    ensemble: NetworkEnsemble,
    splits: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    num_classes: int,
    batch_size: int = 1024,
) -> dict[str, dict]:
    """Score every network on every split: {split: {"per_repeat": [metrics per net], "summary": ...}}.

    `splits[name] = (images, labels, attributes)`; images are moved to the ensemble's device in batches.
    """
    results: dict[str, dict] = {}
    for name, (images, labels, attributes) in splits.items():
        pred = ensemble.predict(images, batch_size=batch_size)  # (R, N)
        per_repeat = [group_metrics(p, labels, attributes, num_classes) for p in pred]
        results[name] = {"per_repeat": per_repeat, "summary": summarise(per_repeat)}
        log.info(
            "%s: accuracy %s",
            name,
            ", ".join("None" if m["accuracy"] is None else f"{m['accuracy']:.4f}" for m in per_repeat),
        )
    return results


__all__ = [
    "METRICS",
    "Augment",
    "NetworkEnsemble",
    "TrainConfig",
    "evaluate_ensemble",
    "group_metrics",
    "lr_at",
    "summarise",
    "train_networks",
]
