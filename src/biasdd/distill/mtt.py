"""Dataset Distillation by Matching Training Trajectories (MTT; Cazenavette et al. 2022; reference
`distill.py` of GeorgeCazenavette/mtt-distillation).

What MTT adds to the driver (docs/protocol.md §6, MTT): it draws no real batches, and each outer
iteration takes one image step. Its loss: a student network starts from one expert's parameters at a
random epoch (`start_epoch` in 0..max_start_epoch - 1), takes `syn_steps` SGD steps on minibatches of the
synthetic set (per-sample DSA, a learned step size), and is compared with the same expert
`expert_epochs` epochs later:

    loss = (||theta_N - theta_target||^2 / P) / (||theta_start - theta_target||^2 / P)

The gradient flows back through all `syn_steps` steps (the unrolled graph) to the images and to the step
size, which MTT learns with its own SGD (`driver.Learnables`, stored in the result as `learned_lr`).

The student is one flat parameter vector (the reference's `ReparamModule`) read by
`torch.func.functional_call`; a step is `theta - lr * grad(CE)(theta)` with `torch.func.grad`, which
keeps the graph of the gradient (the reference's `autograd.grad(..., create_graph=True)`). On the CPU the
step goes through `torch.compile` (inductor fuses the norm, ReLU and pooling of the step and of its
backward) and the compute settings (bf16 autocast); the augmentation stays eager.

Memory: the unrolled graph keeps every step's activations (and those of its gradient) until the image
step, so it grows linearly with `syn_steps` x `batch_syn` (docs/protocol.md §6, MTT).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from biasdd.config import PositiveFloat, PositiveInt
from biasdd.distill.driver import Batch, Context, DistillConfig, Learnables
from biasdd.errors import ConfigError
from biasdd.training.augment import dsa_augment
from biasdd.training.compute import Compiled, ComputeConfig, NetworkRunner, full_precision
from biasdd.training.nets import PatchGradConv2d, with_mask_relu
from biasdd.vocab import LEARNED_LR  # the name of the learned step size in the result and the artifact

MOMENTUM_LR = 0.5  # reference distill.py: SGD([syn_lr], lr=lr_lr, momentum=0.5)


@dataclass(frozen=True)
class MTTConfig(DistillConfig):
    """MTT's params section (docs/protocol.md §6, MTT). `batch_real` is unused: MTT matches expert
    trajectories, not real batches (the shared `DistillConfig` requires the key)."""

    SECTION: ClassVar[str] = "distill.mtt"

    syn_steps: PositiveInt  # student steps on the synthetic set per iteration (N in the paper)
    expert_epochs: PositiveInt  # expert epochs those steps are matched to (M)
    max_start_epoch: PositiveInt  # the start epoch is drawn from 0..max_start_epoch - 1 (T+)
    lr_lr: PositiveFloat  # SGD learning rate of the learned step size
    lr_teacher: PositiveFloat  # the learned step size's initial value (the experts' learning rate)
    batch_syn: PositiveInt | None  # synthetic images per student step; null (or >= K * ipc): all


@dataclass(frozen=True)
class Trajectories:
    """Expert trajectories (the experts stage's artifact): `params` (E, T + 1, P), expert e's flat
    parameters before training (index 0) and after each of its T epochs, concatenated in `names` order
    (the network's `named_parameters`) with the given shapes."""

    params: Tensor
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.params.ndim != 3:
            raise ValueError(f"trajectories: expected params (E, T + 1, P), got {tuple(self.params.shape)}")
        if self.params.shape[2] != sum(math.prod(s) for s in self.shapes):
            raise ValueError("trajectories: the parameter count does not match the shapes")

    @property
    def num_experts(self) -> int:
        return self.params.shape[0]

    @property
    def epochs(self) -> int:
        return self.params.shape[1] - 1


def layout(net: nn.Module) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(names, shapes) of `net`'s parameters, the order of a flat parameter vector."""
    named = list(net.named_parameters())
    return tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named)


def check_fits(trajectories: Trajectories, cfg: MTTConfig, where: str = "distill.mtt") -> None:
    """The deepest target epoch, max_start_epoch - 1 + expert_epochs, must lie on the trajectories."""
    deepest = cfg.max_start_epoch - 1 + cfg.expert_epochs
    if deepest > trajectories.epochs:
        raise ConfigError(
            f"{where}.max_start_epoch - 1 + {where}.expert_epochs = {deepest} must be at most the experts' "
            f"{trajectories.epochs} epochs (`experts.epochs`); lower them or train longer experts"
        )


def unflatten(flat: Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> dict[str, Tensor]:
    """{name: view of `flat`} in the layout of `names` and `shapes`."""
    sizes = [math.prod(s) for s in shapes]
    return {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}


def trajectory_loss(final: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """The reference's normalised distance (||final - target||^2 / P) / (||start - target||^2 / P)."""
    num_params = final.numel()
    return (((final - target) ** 2).sum() / num_params) / (((start - target) ** 2).sum() / num_params)


class TrajectoryMatching:
    """MTT's part of an outer iteration: one image step on an unrolled student trajectory."""

    steps = 1

    def __init__(self, cfg: MTTConfig, context: Context) -> None:
        trajectories = context.upstream
        if not isinstance(trajectories, Trajectories):
            raise ValueError("upstream: MTT needs its expert trajectories (an `mtt.Trajectories`)")
        check_fits(trajectories, cfg)
        self.cfg, self.context, self.trajectories = cfg, context, trajectories
        dtype = trajectories.params.dtype
        self.syn_lr = torch.tensor(cfg.lr_teacher, dtype=dtype, device=context.device).requires_grad_(True)
        optimizer = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=MOMENTUM_LR)
        self.learnables = Learnables({LEARNED_LR: self.syn_lr}, optimizer)
        self.student: Compiled | None = None
        self.start_params = self.target_params = torch.empty(0)

    def start(self, runner: NetworkRunner) -> None:
        """Draw an expert and a start epoch; the fresh network's own init is not used (the reference
        overwrites it with the expert's parameters)."""
        if self.student is None:
            self.student = self._student(runner)
        generator, cfg = self.context.generator, self.cfg
        draw = dict(generator=generator, device=generator.device)
        expert = int(torch.randint(self.trajectories.num_experts, (1,), **draw))
        start_epoch = int(torch.randint(cfg.max_start_epoch, (1,), **draw))  # the reference's randint
        trajectory = self.trajectories.params[expert]  # (T + 1, P)
        self.start_params = trajectory[start_epoch].to(self.context.device)
        self.target_params = trajectory[start_epoch + cfg.expert_epochs].to(self.context.device)

    def loss(self, runner: NetworkRunner, batch: Batch) -> Tensor:
        """`syn_steps` student steps from the start parameters, then the normalised distance to the target.

        Minibatches as the reference: a random permutation of the synthetic set split into chunks of
        `batch_syn`, taken from the end of the list, a new permutation when it is empty; each with
        per-sample DSA (not siamese) when the method has a DSAConfig.
        """
        assert self.student is not None  # built by start()
        context, cfg = self.context, self.cfg
        generator, dsa = context.generator, context.dsa
        syn = batch.syn.flatten(0, 1)  # (K * ipc, C, H, W), class-major as syn_labels
        count = syn.shape[0]
        size = count if cfg.batch_syn is None else min(cfg.batch_syn, count)
        # the reference's `requires_grad_(True)` on the start: one graph signature for every step (the
        # adjoint of the start costs one more Hessian-vector product, not another compilation)
        theta = self.start_params.detach().requires_grad_(True)
        chunks: list[Tensor] = []
        for _ in range(cfg.syn_steps):
            if not chunks:
                order = torch.randperm(count, generator=generator, device=generator.device)
                chunks = list(order.to(syn.device).split(size))
            index = chunks.pop()
            images = syn[index]
            if dsa is not None:
                images = dsa_augment(images, dsa, generator)  # per sample (the reference's DiffAugment)
            # one memory layout (the augmentation's ops leave different strides): no recompilation
            theta = self.student(theta, images.contiguous(), context.syn_labels[index], self.syn_lr)
        return trajectory_loss(theta, self.start_params, self.target_params)

    def between(self, runner: NetworkRunner, syn: Tensor) -> None:
        """Never called: one step per outer iteration."""

    def _student(self, runner: NetworkRunner) -> Compiled:
        """The student's step on `runner`'s network, after checking the experts were recorded for it."""
        names, shapes = layout(runner.net)
        if (names, shapes) != (self.trajectories.names, self.trajectories.shapes):
            raise ValueError(
                "upstream: the expert trajectories were recorded for another network "
                f"({len(self.trajectories.names)} tensors) than the one distilled with ({len(names)})"
            )
        return student_step(runner.net, runner.compute, runner.device)


def student_step(
    net: nn.Module, compute: ComputeConfig, device: torch.device | str, mask_relu: bool = True
) -> Compiled:
    """The student's SGD step theta -> theta - lr * grad CE(theta) on `net`'s flat parameters (`layout`
    order), compiled on the CPU; `net` itself is left as it is.

    `mask_relu`: run on a copy whose ReLUs keep their mask in the compute dtype (the values are the
    network's): inductor's CPU code handles bool masks one byte at a time (see MaskReLU). False only to
    measure that (benchmarks/mtt_student_step.py)."""
    net = with_mask_relu(net) if mask_relu else copy.deepcopy(net)
    names, shapes = layout(net)
    for module in net.modules():
        if isinstance(module, PatchGradConv2d):
            module.patch_grad = False  # the images need their gradient (see PatchGradConv2d)

    def cross_entropy(theta: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        with compute.autocast(device):
            logits = functional_call(net, unflatten(theta, names, shapes), (images,))
        return F.cross_entropy(full_precision(logits), labels)

    def step(theta: Tensor, images: Tensor, labels: Tensor, lr: Tensor) -> Tensor:
        return theta - lr * torch.func.grad(cross_entropy)(theta, images, labels)

    # Compiled from the first call, so a resumed run computes what an uninterrupted one does.
    # Inductor's channels-last layout: in bf16 it keeps oneDNN's convolutions (and their double
    # backward) fast; in fp32 the same layout sent the double backward to a slow convolution path
    # (measured on a 2-core CPU at width 32: 28 s per iteration against 3.3 s without it).
    options = {"layout_optimization": compute.precision == "bf16"}
    return Compiled(step, compute.compiles_on(device), after=1, options=options)
