"""Training fresh networks: the evaluation networks on a synthetic or the full set (docs/protocol.md §7).

Each network has its own init, data order and augmentation, drawn from its own generator in one fixed
order (init, then per epoch one permutation, then per batch one augmentation call), so the two ways of
training below give the same networks up to float round-off (tests/test_train.py):

- On accelerators the R networks train AT ONCE: their parameters are stacked
  (`torch.func.stack_module_state`) and one `vmap`-ed `functional_call` runs all R forwards on an
  (R, B, C, H, W) batch, with one backward pass and one optimiser step over the stacked tensors. A
  synthetic set of 500 images is only 2 batches per epoch, so one network at a time would be bound by
  per-launch overhead.
- On the CPU, where vmapped (grouped) convolutions are slower than separate ones, the networks train
  one after the other as plain modules, through the compute settings (`biasdd.training.compute`: bf16
  autocast, `torch.compile`); one module object is reused, so its compiled code is compiled once.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm

from biasdd.config import Config, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Range
from biasdd.errors import ConfigError
from biasdd.training.compute import CPU_CHUNK, FP32, ComputeConfig, NetworkRunner, chunks, full_precision

log = logging.getLogger(__name__)

# (B, C, H, W) -> (B, C, H, W); all randomness drawn from the generator.
Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class TrainConfig(Config):
    """SGD training of an evaluation network (docs/protocol.md §7; values come from `params.yaml`).

    Epoch e trains at `lr * lr_gamma ** (number of milestones <= e)`, and the momentum buffer is reset
    at each milestone (the reference re-creates the optimiser: `epoch_eval_train` in Zhao & Bilen's
    DatasetCondensation `utils.py`). Note the reference loops over `Epoch + 1` epochs and decays after
    epoch `Epoch // 2`; here `epochs` is the exact count and milestone m is the first decayed epoch
    (the `MultiStepLR` convention), so 1000 epochs with milestone 500 give 500 + 500.
    """

    SECTION: ClassVar[str] = "evaluate"

    epochs: PositiveInt  # 1000 synthetic / 150 full set
    lr: PositiveFloat  # 0.01
    momentum: Fraction  # 0.9
    weight_decay: NonNegativeFloat  # 5e-4
    batch_size: PositiveInt  # 256
    lr_milestones: tuple[int, ...]  # (500,) synthetic; (50, 100) full set
    lr_gamma: Annotated[float, Range(gt=0, le=1)]  # 0.1

    def check(self, where: str) -> None:
        milestones = self.lr_milestones
        if any(b <= a for a, b in zip(milestones[:-1], milestones[1:], strict=True)):
            raise ConfigError(f"{where}.lr_milestones: {list(milestones)} must be strictly increasing")
        if any(m < 1 or m >= self.epochs for m in milestones):
            # A milestone outside 1..epochs-1 would silently never fire (e.g. a shortened budget
            # that forgot to shorten its milestones), so fail loudly instead.
            raise ConfigError(
                f"{where}.lr_milestones: {list(milestones)} must lie in [1, epochs - 1] = "
                f"[1, {self.epochs - 1}]"
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
    def logits(self, images: Tensor, batch_size: int = 1024, compute: ComputeConfig = FP32) -> Tensor:
        """Eval-mode logits (float32) of every network on the same images: (N, C, H, W) -> (R, N, K).

        On the CPU one network at a time over cache-sized chunks (`compute.CPU_CHUNK`), else all
        networks at once (vmap) over batches of `batch_size`; `compute.precision` applies (no compile:
        scoring is one pass)."""
        was_training = self.base.training
        self.base.eval()
        try:
            params = {k: v.detach() for k, v in self.params.items()}
            with compute.autocast(self.device):
                if self.device.type == "cpu":  # grouped convolutions are slow on the CPU
                    out = torch.stack(
                        [
                            torch.cat(
                                [
                                    self._call(
                                        {k: v[r] for k, v in params.items()},
                                        {k: v[r] for k, v in self.buffers.items()},
                                        images[start:end].to(self.device),
                                    )
                                    for start, end in chunks(images.shape[0], CPU_CHUNK)
                                ]
                            )
                            for r in range(self.num_networks)
                        ]
                    )
                else:
                    run_all = torch.func.vmap(self._call, in_dims=(0, 0, None))
                    out = torch.cat(
                        [
                            run_all(params, self.buffers, images[start:end].to(self.device))
                            for start, end in chunks(images.shape[0], batch_size)
                        ],
                        dim=1,
                    )
        finally:
            self.base.train(was_training)
        return full_precision(out)  # (R, N, K)

    def predict(self, images: Tensor, batch_size: int = 1024, compute: ComputeConfig = FP32) -> Tensor:
        """Top-1 predictions of every network, (R, N) int64, in eval mode without gradients."""
        return self.logits(images, batch_size, compute).argmax(dim=-1)

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
    compute: ComputeConfig = FP32,
    batched: bool | None = None,
) -> NetworkEnsemble:
    """Train R = len(generators) fresh networks on (images, labels); docs/protocol.md §7.

    `images` is (N, C, H, W) shared by all networks, or (R, N, C, H, W) with `labels` (R, N): one
    training set per network (each evaluation repeat on its own distillation).
    `batched=None` trains the R networks at once on accelerators (stacked, vmapped) and one after the
    other on the CPU; both give the same networks (see the module docstring).

    Network r is `net_factory(generators[r])`, sees the data in its own random order each epoch
    (a permutation drawn from `generators[r]`) and gets its own augmentation
    (`augment(batch, generators[r])`, one call per network and batch, without a graph). Every network
    sees all N samples per epoch in ceil(N / batch_size) batches, the last one partial (the reference's
    DataLoader with shuffle=True, drop_last=False). The optimiser is re-created at each milestone
    (lr times gamma, momentum reset), as the reference does.

    Training runs on `images.device`; the data stays there as one tensor and only each batch is
    gathered per step. `compute`: precision and compilation (`biasdd.training.compute`). `log_every`: epochs
    between loss read-outs for the progress bar (each read-out is one host sync).
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
    labels = labels.to(device=images.device, dtype=torch.long)
    if batched:
        return _train_stacked(
            images, labels, net_factory, cfg, generators, augment, progress, log_every, compute
        )
    return _train_one_by_one(
        images, labels, net_factory, cfg, generators, augment, progress, log_every, compute
    )


def _batch_bounds(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def _progress(cfg: TrainConfig, progress: bool, desc: str) -> tqdm:
    return tqdm(range(cfg.epochs), desc=desc, disable=None if progress else True, leave=False)


def _train_one_by_one(
    images: Tensor,
    labels: Tensor,
    net_factory: Callable[[torch.Generator], nn.Module],
    cfg: TrainConfig,
    generators: Sequence[torch.Generator],
    augment: Augment | None,
    progress: bool,
    log_every: int,
    compute: ComputeConfig,
) -> NetworkEnsemble:
    """The CPU path: one plain module, re-initialised from each generator and trained in turn."""
    device = images.device
    per_network = images.dim() == 5
    milestones = set(cfg.lr_milestones)
    work: nn.Module | None = None
    runner: NetworkRunner | None = None
    trained: list[nn.Module] = []
    losses = []
    for r, generator in enumerate(generators):
        fresh = net_factory(generator).to(device)
        if work is None:
            work, runner = fresh, NetworkRunner(fresh, compute, device)
        else:
            work.load_state_dict(fresh.state_dict())  # the same module: its compiled code is reused
        assert runner is not None
        work.train()
        data = images[r] if per_network else images
        targets = labels[r] if per_network else labels
        optimizer = _sgd(work.parameters(), cfg, 0)
        epoch_loss = torch.zeros((), device=device)  # the mean batch loss of the last epoch
        bar = _progress(cfg, progress, f"train eval net {r + 1}/{len(generators)}")
        for epoch in bar:
            if epoch in milestones:
                optimizer = _sgd(work.parameters(), cfg, epoch)  # new lr, momentum reset (the reference)
            epoch_loss = train_epoch(runner, optimizer, data, targets, cfg.batch_size, generator, augment)
            if not bar.disable and (epoch % log_every == 0 or epoch == cfg.epochs - 1):
                bar.set_postfix(loss=f"{float(epoch_loss):.4f}")  # one sync
        bar.close()
        losses.append(epoch_loss)
        trained.append(copy.deepcopy(work))
    return _ensemble(trained, torch.stack(losses))


def train_epoch(
    runner: NetworkRunner,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    augment: Augment | None = None,
) -> Tensor:
    """One epoch of `runner.net` on (images, labels) (N, ...) on their device: a random order from
    `generator`, then ceil(N / batch_size) steps of mean cross-entropy, the last batch partial (the
    reference's shuffled DataLoader, drop_last=False), each batch augmented (`augment(batch, generator)`,
    without a graph). Returns the mean of the batches' losses, a 0-d tensor on the device (no sync)."""
    num_samples = images.shape[0]
    bounds = _batch_bounds(num_samples, batch_size)
    order = torch.randperm(num_samples, generator=generator, device=generator.device).to(images.device)
    epoch_loss = torch.zeros((), device=images.device)
    for start, end in bounds:
        index = order[start:end]
        batch = images[index]
        if augment is not None:
            with torch.no_grad():
                batch = augment(batch, generator)
        loss = F.cross_entropy(runner.forward(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        epoch_loss += loss.detach()
    return epoch_loss / len(bounds)


def _sgd(params, cfg: TrainConfig, epoch: int) -> torch.optim.SGD:
    """The optimiser of `epoch`: a new one at each milestone (new lr, momentum buffers reset)."""
    return torch.optim.SGD(params, lr=lr_at(epoch, cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _ensemble(nets: list[nn.Module], train_loss: Tensor) -> NetworkEnsemble:
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    base.train()
    return NetworkEnsemble(
        base=base,
        params={k: v.detach() for k, v in params.items()},
        buffers=dict(buffers),
        train_loss=train_loss,
    )


def _train_stacked(
    images: Tensor,
    labels: Tensor,
    net_factory: Callable[[torch.Generator], nn.Module],
    cfg: TrainConfig,
    generators: Sequence[torch.Generator],
    augment: Augment | None,
    progress: bool,
    log_every: int,
    compute: ComputeConfig,
) -> NetworkEnsemble:
    """The accelerator path: the R networks at once as stacked parameters under `vmap`.

    The loss is the sum over networks of each network's mean cross-entropy, so the gradient of each
    network's stacked slice is exactly its own; SGD with momentum and weight decay is elementwise, so
    one optimiser over the stacked tensors equals R separate ones. Models with buffers that change in
    training (batch norm running stats) are not supported under `vmap`; ConvNet has none.
    """
    device = images.device
    per_network = images.dim() == 5
    num_samples = images.shape[-4]
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
    stacked = list(params.values())

    def make_optimizer(epoch: int) -> torch.optim.SGD:
        return torch.optim.SGD(
            stacked, lr=lr_at(epoch, cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    optimizer = make_optimizer(0)
    milestones = set(cfg.lr_milestones)
    bounds = _batch_bounds(num_samples, cfg.batch_size)
    epoch_loss = torch.zeros(num_networks, device=device)

    bar = _progress(cfg, progress, "train eval nets")
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
            with compute.autocast(device):
                logits = full_precision(forward_all(params, buffers, batch))  # (R, B, K)
            per_net = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            per_net = per_net.view(num_networks, end - start).mean(dim=1)  # (R,) each net's mean CE
            optimizer.zero_grad(set_to_none=True)
            per_net.sum().backward()
            optimizer.step()
            epoch_loss += per_net.detach()
        if not bar.disable and (epoch % log_every == 0 or epoch == cfg.epochs - 1):
            bar.set_postfix(loss=f"{(epoch_loss / len(bounds)).mean().item():.4f}")  # one sync
    bar.close()

    return NetworkEnsemble(
        base=base,
        params={k: v.detach() for k, v in params.items()},
        buffers=dict(buffers),
        train_loss=epoch_loss / len(bounds),
    )


# --- short Adam runs (the bias model, the bias classifier) ------------------------------------------

# A compilation costs ~10-20 s (cold cache) and saves ~20-60 ms per step at these sizes (measured on a
# 2-core CPU): below this many steps, eager is faster.
COMPILE_MIN_STEPS = 500


def train_steps(
    net: nn.Module,
    images: Tensor,
    targets: Tensor,
    draw: Callable[[int, torch.Generator], Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    desc: str,
    progress: bool,
    compute: ComputeConfig = FP32,
) -> nn.Module:
    """`steps` Adam steps on batches drawn by `draw` (indices into `images`); the data stays on its
    device. Returns `net` in eval mode. Runs shorter than COMPILE_MIN_STEPS stay eager: compiling costs
    more than it saves there."""
    net.train()
    if steps < COMPILE_MIN_STEPS:
        compute = dataclasses.replace(compute, compile=False)
    runner = NetworkRunner(net, compute, images.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    bar = tqdm(range(steps), desc=desc, disable=None if progress else True, leave=False)
    for _ in bar:
        index = draw(batch_size, generator).to(images.device)
        loss = loss_fn(runner.forward(images[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    bar.close()
    net.eval()
    return net


@torch.no_grad()
def predict_logits(
    net: nn.Module, images: Tensor, batch_size: int = 1024, compute: ComputeConfig = FP32
) -> Tensor:
    """(N, K) float32 eval-mode logits in batches (cache-sized chunks on the CPU), on the net's device."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    size = min(batch_size, CPU_CHUNK) if device.type == "cpu" else batch_size
    try:
        with compute.autocast(device):
            out = [
                full_precision(net(images[start:end].to(device)))
                for start, end in chunks(images.shape[0], size)
            ]
    finally:
        net.train(was_training)
    return torch.cat(out)
