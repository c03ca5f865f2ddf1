"""The one distillation loop. A method (DC, DSA, DM, or a new one) supplies only what differs.

The driver owns everything methods share (docs/protocol.md §6): input checks, the real-image samplers
(debiased or not), the synthetic init, the image optimiser, a fresh network per outer iteration,
drawing each step's real (and bias-aligned) batches with siamese DSA, the loss log, progress,
checkpoints and resume. A method is a `Method` registry entry: its config class (the params section
`distill.<key>`) and a `Matcher` that says how many image steps an outer iteration takes, what the
loss of one step is, and what happens between steps (DC/DSA train the network; DM does nothing).
A method may also draw no real batches (`Method.draws_real`: MTT matches expert trajectories, passed
as `upstream`) and learn tensors besides the images with their own optimiser (`Learnables`: MTT's
learning rate), which the driver steps, checkpoints and returns (`DistillResult.extras`).

Random numbers all come from the caller's `torch.Generator`, in a fixed order; the generator's state
plus the synthetic images and the image optimiser's state (and a method's learnables with theirs) are
the whole state of a run, so a checkpoint of those resumes bit-identically.

    result = METHODS["dm"](real_images, real_labels, num_classes, cfg, net_factory, generator, dsa=dsa)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from biasdd import artifacts
from biasdd.config import Config, Fraction, PositiveFloat, PositiveInt
from biasdd.distill.sampling import ClassSampler, DebiasTargets, RealSampling, Sampler, real_sampling
from biasdd.training.augment import DSAConfig, dsa_augment
from biasdd.training.compute import FP32, ComputeConfig, NetworkRunner

logger = logging.getLogger(__name__)

POSTFIX_EVERY = 25  # iterations between progress-bar loss updates (each one syncs the device once)


@dataclass(frozen=True)
class DistillConfig(Config):
    """What every method's params section `distill.<key>` holds (docs/protocol.md §6)."""

    SECTION: ClassVar[str] = "distill"

    ipc: PositiveInt  # synthetic images per class
    iterations: PositiveInt  # outer iterations
    lr_img: PositiveFloat  # image SGD learning rate
    momentum_img: Fraction  # image SGD momentum
    batch_real: PositiveInt  # real images per class per image step
    init: Literal["noise", "real"]  # synthetic init: N(0, 1) noise, or random real images of the class
    # the image learning rate under synchronized matching (debias fairdd, inferred_fairdd, where groups
    # are kept), whose loss sums one distance per group; None: lr_img, as FairDD's reference. Optional: a
    # method that takes no debias (MTT) need not name it
    lr_img_synchronized: PositiveFloat | None = field(default=None, kw_only=True)


@dataclass
class DistillResult:
    """A distilled set: images (K * ipc, C, H, W) float32 on CPU in normalised space, labels (K * ipc,)
    int64 sorted by class, one loss per outer iteration, and the final values of the method's own
    learnable tensors, if any (`extras`, CPU copies by name: MTT's learned learning rate)."""

    images: Tensor
    labels: Tensor
    losses: list[float] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """One image step's inputs, class-major: slice c of each tensor holds class c."""

    real: Tensor | None  # (K, batch_real, C, H, W), a constant target; None for a method that draws none
    syn: Tensor  # (K, ipc, C, H, W), differentiable wrt the synthetic images
    aligned: Tensor | None  # (K, batch_real, C, H, W): the bias-aligned batch, with repulsion only
    groups: Tensor | None = None  # (K, batch_real) int64: each real image's group (synchronized matching)


@dataclass
class Context:
    """What a method's matcher knows about the run."""

    num_classes: int
    ipc: int
    syn_labels: Tensor  # (K * ipc,) int64, sorted by class
    sampling: RealSampling  # repulsion, max_shift, aligned_valid for debiased losses
    dsa: DSAConfig | None  # the DSA parameters when the method uses them
    generator: torch.Generator
    device: torch.device
    upstream: Any = None  # a stage's further input the method reads (MTT: its expert trajectories)


@dataclass
class Learnables:
    """Tensors a method learns besides the images (MTT's learning rate), with their own optimiser.

    The driver differentiates each image step's loss with respect to them too, steps `optimizer` after
    the image optimiser, keeps both in checkpoints (a resumed run is bit-identical) and returns their
    final values in `DistillResult.extras`.
    """

    tensors: dict[str, Tensor]  # name -> leaf tensor with requires_grad
    optimizer: torch.optim.Optimizer


class Matcher(Protocol):
    """A method's part of one outer iteration (a fresh network each time).

    Optional: a `learnables` attribute (`Learnables`) for tensors the method learns besides the images;
    a matcher without it has none.
    """

    steps: int  # image steps per outer iteration

    def start(self, runner: NetworkRunner) -> None:
        """Called with the fresh network (in `runner.net`) before the first image step."""

    def loss(self, runner: NetworkRunner, batch: Batch) -> Tensor:
        """The step's loss, summed over classes; differentiable wrt `batch.syn`."""

    def between(self, runner: NetworkRunner, syn: Tensor) -> None:
        """After every image step but the last (e.g. train the network on the detached `syn`)."""


@dataclass(frozen=True)
class Method:
    """One registry entry: the config of `distill.<name>` and the matcher built from it."""

    name: str
    config: type[DistillConfig]
    matcher: Callable[[Any, Context], Matcher]  # (config, context) -> Matcher
    uses_dsa: bool  # the method gets the DSAConfig; its real and synthetic batches get siamese DSA
    draws_real: bool = True  # False: the driver draws no real batch (`Batch.real` is None) and no numbers
    needs_experts: bool = False  # reads expert trajectories (`upstream`; the experts stage trains them)
    loss_per_class: bool = True  # the loss is a sum over classes: logged per class (the reference's)

    def __call__(self, *args: Any, **kwargs: Any) -> DistillResult:
        """Distil with this method: `distill(method, ...)` with the same arguments."""
        return distill(self, *args, **kwargs)


def distill(
    method: Method,
    real_images: Tensor,
    real_labels: Tensor,
    num_classes: int,
    cfg: DistillConfig,
    net_factory: Callable[[torch.Generator], nn.Module],
    generator: torch.Generator,
    dsa: DSAConfig | None = None,
    compute: ComputeConfig = FP32,
    resume: Mapping[str, Any] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    debias: DebiasTargets | None = None,
    upstream: Any = None,
) -> DistillResult:
    """Distil `real_images` (N, C, H, W) with labels (N,) into `cfg.ipc` images per class.

    Each outer iteration draws a fresh network; the method's matcher then takes `steps` image steps,
    each on a new real batch of `cfg.batch_real` images per class (plus a bias-aligned batch when
    `debias.repulsion` > 0), with one siamese DSA call over real and synthetic images (one parameter set
    per class) when the method uses DSA. The loss logged per outer iteration is the per-class mean over
    its steps (the reference's `loss_avg`). `resume`: a `checkpoint_state` snapshot to continue from;
    `on_checkpoint` gets one every `checkpoint_every` outer iterations. `debias=None` is the plain method.
    A method that draws no real batch (`method.draws_real` False, e.g. MTT) gets no siamese DSA and
    takes no debias; `upstream` is what it reads besides the images (MTT: `mtt.Trajectories`).
    """
    check_inputs(real_images, real_labels, num_classes)
    if not method.draws_real and debias is not None:
        raise ValueError(f"debias: {method.name} draws no real batches, so it takes no debiased targets")
    if method.needs_experts and upstream is None:
        raise ValueError(f"upstream: {method.name} needs its expert trajectories")
    device = real_images.device
    sampling = real_sampling(ClassSampler(real_labels, num_classes), real_labels, num_classes, debias)
    own_dsa = dsa if method.uses_dsa else None  # what the method's context gets
    dsa = own_dsa if method.draws_real else None  # siamese DSA on each step's real and synthetic batches
    ipc, batch_real, shape = cfg.ipc, cfg.batch_real, real_images.shape[1:]

    syn = init_synthetic(real_images, sampling.init, ipc, cfg.init, generator).requires_grad_(True)
    syn_labels = class_labels(num_classes, ipc, device)
    real_groups = class_labels(num_classes, batch_real, device)
    # siamese: the class is the group id, shared by its real, aligned and synthetic images
    groups = torch.cat([real_groups] * (1 if sampling.aligned is None else 2) + [syn_labels])
    synchronized = sampling.groups is not None and cfg.lr_img_synchronized is not None
    lr_img = cfg.lr_img_synchronized if synchronized else cfg.lr_img
    optimizer = torch.optim.SGD([syn], lr=lr_img, momentum=cfg.momentum_img)
    networks = FreshNetworks(net_factory, generator)
    runner = NetworkRunner(networks.net, compute, device)
    context = Context(num_classes, ipc, syn_labels, sampling, own_dsa, generator, device, upstream)
    matcher = method.matcher(cfg, context)
    learnables: Learnables | None = getattr(matcher, "learnables", None)  # optional (see Matcher)
    per_step = num_classes if method.loss_per_class else 1

    start, log = 0, LossLog()
    if resume is not None:
        start, log = restore_state(resume, syn, optimizer, generator, cfg.iterations, learnables)

    bar = progress_bar(start, cfg.iterations, method.name, progress)
    for iteration in bar:
        net = networks.next(generator)
        if net is not runner.net:  # a network reinitialise_ does not know is rebuilt every time
            runner = NetworkRunner(net, compute, device)
        matcher.start(runner)
        total = torch.zeros((), device=device, dtype=real_images.dtype)
        for step in range(matcher.steps):
            real = aligned = drawn = None
            if method.draws_real:
                drawn = sampling.target.sample(batch_real, generator)  # (K * batch_real,)
                real = real_images[drawn]  # (K * batch_real, C, H, W)
                if sampling.aligned is not None:
                    aligned = real_images[sampling.aligned.sample(batch_real, generator)]
            syn_in = syn
            if dsa is not None:
                parts = [real, syn] if aligned is None else [real, aligned, syn]
                constant = sum(p.shape[0] for p in parts[:-1])  # real (and aligned) images: no graph
                augmented = dsa_augment(torch.cat(parts), dsa, generator, groups=groups, constant=constant)
                pieces = augmented.split([p.shape[0] for p in parts])
                real, syn_in = pieces[0], pieces[-1]
                aligned = pieces[1] if aligned is not None else None
            batch = Batch(
                None if real is None else real.view(num_classes, batch_real, *shape),
                syn_in.view(num_classes, ipc, *shape),
                None if aligned is None else aligned.view(num_classes, batch_real, *shape),
                None
                if sampling.groups is None or drawn is None
                else sampling.groups[drawn].view(num_classes, batch_real),
            )
            loss = matcher.loss(runner, batch)
            optimizer.zero_grad(set_to_none=True)
            if learnables is None:
                (syn.grad,) = torch.autograd.grad(loss, [syn])  # only the images' gradient is needed
            else:
                syn.grad, *grads = torch.autograd.grad(loss, [syn, *learnables.tensors.values()])
                learnables.optimizer.zero_grad(set_to_none=True)
                for tensor, grad in zip(learnables.tensors.values(), grads, strict=True):
                    tensor.grad = grad
            optimizer.step()
            if learnables is not None:
                learnables.optimizer.step()
            total += loss.detach()
            if step < matcher.steps - 1:
                matcher.between(runner, syn.detach())
        log.append(total / (per_step * matcher.steps))
        update_progress(bar, iteration, log)
        maybe_checkpoint(
            iteration + 1, checkpoint_every, on_checkpoint, syn, optimizer, generator, log, learnables
        )
    return finish(syn, num_classes, ipc, log, learnables)


# --- synthetic init ---------------------------------------------------------------------------------


def class_labels(num_classes: int, per_class: int, device: torch.device | str) -> Tensor:
    """(K * per_class,) int64: [0] * per_class + [1] * per_class + ..."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def init_synthetic(
    real_images: Tensor,
    sampler: Sampler,
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
    return real_images[sampler.sample_distinct(ipc, generator)].detach().clone()


# --- fresh networks ---------------------------------------------------------------------------------

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
    iteration: int,
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    log: LossLog,
    learnables: Learnables | None = None,
) -> dict[str, Any]:
    """A self-contained snapshot (CPU copies) of a run after `iteration` completed outer iterations."""
    state = {
        "iteration": iteration,
        "images": images.detach().to("cpu", copy=True),
        "optimizer": artifacts.to_cpu(optimizer.state_dict()),
        "generator": generator.get_state(),
        "losses": log.values(),
    }
    if learnables is not None:
        state["learnables"] = {
            "tensors": artifacts.to_cpu(learnables.tensors),
            "optimizer": artifacts.to_cpu(learnables.optimizer.state_dict()),
        }
    return state


def restore_state(
    state: Mapping[str, Any],
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    iterations: int,
    learnables: Learnables | None = None,
) -> tuple[int, LossLog]:
    """Load a `checkpoint_state` snapshot into the live objects; returns (start iteration, loss log)."""
    keys = {"iteration", "images", "optimizer", "generator", "losses"}
    missing = sorted((keys | ({"learnables"} if learnables else set())) - set(state))
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
    if learnables is not None:
        with torch.no_grad():
            for name, tensor in learnables.tensors.items():
                tensor.copy_(state["learnables"]["tensors"][name].to(tensor.device))
        learnables.optimizer.load_state_dict(state["learnables"]["optimizer"])
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


def finish(
    images: Tensor, num_classes: int, ipc: int, log: LossLog, learnables: Learnables | None = None
) -> DistillResult:
    return DistillResult(
        images=images.detach().to("cpu", dtype=torch.float32, copy=True),
        labels=class_labels(num_classes, ipc, "cpu"),
        losses=log.values(),
        extras={} if learnables is None else artifacts.to_cpu(learnables.tensors),
    )


def maybe_checkpoint(
    iteration_done: int,
    checkpoint_every: int,
    on_checkpoint: Callable[[dict], None] | None,
    images: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    log: LossLog,
    learnables: Learnables | None = None,
) -> None:
    """Call `on_checkpoint` after every `checkpoint_every` completed outer iterations."""
    if on_checkpoint is None or checkpoint_every <= 0 or iteration_done % checkpoint_every:
        return
    on_checkpoint(checkpoint_state(iteration_done, images, optimizer, generator, log, learnables))


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
