"""Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen 2021; reference `main.py`).

What DC adds to the driver (docs/protocol.md §6): an outer iteration takes `outer_loop` image steps on
one fresh network; each step matches, class by class, the gradient of the CE on a real batch with the
gradient on the class's synthetic images (layer-wise cosine distance), and between steps the network
trains for `inner_loop` epochs on the synthetic set. DSA (`dsa.py`) is the same matcher with siamese
augmentation in the steps and per-sample augmentation in the network's training.

Per-class gradients: on accelerators, `torch.func.vmap` over the class axis of `torch.func.grad`
gives all K gradients from one batched pass (a grouped convolution); on the CPU, where grouped
convolutions measured 2-10x slower, a loop over classes. The real side (a constant target, no graph)
runs through the compute settings (`biasdd.training.compute`: bf16, torch.compile on the CPU); the synthetic
side needs the graph of its gradient (double backward, which torch.compile does not support) and runs
eagerly in fp32. Both paths are tested against a plain per-class reference (tests/test_distill.py).

Debiased targets (docs/protocol.md §9): the real batch of class c is drawn by importance sampling from
the debiasing weights, so the gradient of its plain mean CE estimates the gradient of the weighted
mean CE; with a repulsion lambda > 0 the driver also draws a bias-aligned batch, giving g_b, and the
loss becomes `debiased_matching_loss`; with groups (FairDD), `synchronized_matching_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from biasdd.config import PositiveFloat, PositiveInt
from biasdd.distill.driver import Batch, Context, DistillConfig
from biasdd.training.augment import DSAConfig, dsa_augment
from biasdd.training.compute import FP32, NetworkRunner, full_precision

logger = logging.getLogger(__name__)

COSINE_EPS = 1e-6  # reference distance_wb


@dataclass(frozen=True)
class GradientMatchingConfig(DistillConfig):
    """DC's and DSA's params section (docs/protocol.md §6): the shared fields plus the loops."""

    SECTION: ClassVar[str] = "distill.dc"

    outer_loop: PositiveInt  # image steps per outer iteration (50 at IPC 50, 10 at IPC 10, 1 at IPC 1)
    inner_loop: PositiveInt  # network epochs on the synthetic set between image steps (10 / 50 / 1)
    lr_net: PositiveFloat  # network SGD learning rate (0.01)
    batch_train: PositiveInt  # batch size of the network updates on the synthetic set (256)


@dataclass(frozen=True)
class DCConfig(GradientMatchingConfig):
    """DC: gradient matching without augmentation (init noise in the paper)."""


# --- the distance -----------------------------------------------------------------------------------


def gradient_distance(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor], leading: int = 0) -> Tensor:
    """DC's layer-wise distance (docs/protocol.md §6; reference `match_loss` with `distance_wb`).

    Sum over weight tensors of ndim > 1 (biases and norm parameters are ignored) of the sum over output
    rows of 1 - cos(g_real_row, g_syn_row); a conv weight (out, in, h, w) is read as `out` rows of
    in * h * w. `leading` batch dimensions (e.g. 1 for a class axis) are summed over too.
    """
    total: Tensor | None = None
    for term in _row_distances(grads_syn, grads_real, leading):
        total = term.sum() if total is None else total + term.sum()
    assert total is not None  # _row_distances raises on a network without weights to match
    return total


def gradient_distance_per_class(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor]) -> Tensor:
    """`gradient_distance` with one leading class axis, kept: (K,) distances, each in [0, 2 * rows]
    (rows = output units summed over the weight tensors). Used for the masked repulsion term."""
    total: Tensor | None = None
    for term in _row_distances(grads_syn, grads_real, leading=1):
        total = term.sum(-1) if total is None else total + term.sum(-1)
    assert total is not None
    return total


def _row_distances(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor], leading: int) -> list[Tensor]:
    """Per weight tensor of ndim > 1: (*leading, out) of 1 - cos per output row."""
    terms = []
    for g_syn, g_real in zip(grads_syn, grads_real, strict=True):
        if g_real.ndim - leading <= 1:
            continue
        rows_syn = g_syn.flatten(leading + 1)  # (*leading, out, in*h*w)
        rows_real = g_real.flatten(leading + 1)
        dot = (rows_syn * rows_real).sum(-1)
        norms = rows_syn.norm(dim=-1) * rows_real.norm(dim=-1)
        terms.append(1 - dot / (norms + COSINE_EPS))
    if not terms:
        raise ValueError("gradient_distance: the network has no weight tensor with ndim > 1 to match")
    return terms


# --- per-class gradients ----------------------------------------------------------------------------


def matched_names(net: nn.Module) -> list[str]:
    """Parameters the distance reads: weight tensors of ndim > 1."""
    return [name for name, param in net.named_parameters() if param.ndim > 1]


class ClassGradients:
    """Per-class parameter gradients {name: (K, *shape)} of each class's mean CE, for the weights of
    ndim > 1. `batched`: vmap over classes (accelerators); else a loop (the CPU). `batched=None` picks
    by device. Falls back to the loop, once and logged, if the batched path fails on some torch."""

    def __init__(self, batched: bool | None = None) -> None:
        self.batched = batched

    def __call__(self, runner: NetworkRunner, images: Tensor, labels: Tensor, create_graph: bool) -> dict:
        """images (K, n, C, H, W), labels (K, n). `create_graph=False` for a constant target (through the
        compute settings); True for the synthetic side (eager fp32, differentiable wrt images)."""
        batched = images.device.type != "cpu" if self.batched is None else self.batched
        if batched:
            try:
                return _batched(runner, images, labels, create_graph)
            except (RuntimeError, NotImplementedError) as error:
                logger.warning("batched per-class gradients failed (%s); looping over classes", error)
                self.batched = False
        return _looped(runner, images, labels, create_graph)


def _split_params(net: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(matched, others): detached views of the current parameters, plus buffers in `others`."""
    names = set(matched_names(net))
    matched, others = {}, {}
    for name, param in net.named_parameters():
        (matched if name in names else others)[name] = param.detach()
    for name, buffer in net.named_buffers():
        others[name] = buffer
    return matched, others


def _batched(runner: NetworkRunner, images: Tensor, labels: Tensor, create_graph: bool) -> dict:
    net = runner.net
    matched, others = _split_params(net)

    def class_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(full_precision(functional_call(net, {**params, **others}, (x,))), y)

    if create_graph:
        return vmap(grad(class_loss), in_dims=(None, 0, 0))(matched, images, labels)
    with torch.no_grad(), runner.compute.autocast(images.device):
        return vmap(grad(class_loss), in_dims=(None, 0, 0))(matched, images, labels)


def _looped(runner: NetworkRunner, images: Tensor, labels: Tensor, create_graph: bool) -> dict:
    net = runner.net
    names = matched_names(net)
    per_class: list[tuple[Tensor, ...]] = []
    if create_graph:
        # Detached leaves: the image loss's backward must not touch the network's own .grad.
        matched, others = _split_params(net)
        leaves = {name: value.requires_grad_(True) for name, value in matched.items()}
        with torch.enable_grad():
            for c in range(images.shape[0]):
                logits = functional_call(net, {**leaves, **others}, (images[c],))
                loss = F.cross_entropy(logits, labels[c])
                per_class.append(torch.autograd.grad(loss, list(leaves.values()), create_graph=True))
    else:
        params = [net.get_parameter(name) for name in names]
        if not all(p.requires_grad for p in params):
            raise ValueError("per-class gradients: the network's weights must require grad")
        with torch.enable_grad():
            for c in range(images.shape[0]):
                loss = F.cross_entropy(runner.forward(images[c].detach()), labels[c])
                per_class.append(tuple(g.detach() for g in torch.autograd.grad(loss, params)))
    return {name: torch.stack([g[i] for g in per_class]) for i, name in enumerate(names)}


def _class_targets(num_classes: int, per_class: int, device: torch.device) -> Tensor:
    return torch.arange(num_classes, device=device).view(-1, 1).expand(-1, per_class)


def matching_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    class_gradients: ClassGradients | None = None,
    runner: NetworkRunner | None = None,
) -> Tensor:
    """Sum over classes of DC's gradient distance; differentiable wrt `syn_images`.

    real_images (K, n_real, C, H, W), syn_images (K, ipc, C, H, W); slice c holds class c.
    """
    class_gradients = class_gradients or ClassGradients()
    runner = runner or NetworkRunner(net, FP32, real_images.device)
    num_classes, device = real_images.shape[0], real_images.device
    grads_real = class_gradients(
        runner, real_images, _class_targets(num_classes, real_images.shape[1], device), False
    )
    grads_syn = class_gradients(
        runner, syn_images, _class_targets(num_classes, syn_images.shape[1], device), True
    )
    names = list(grads_real)
    return gradient_distance([grads_syn[n] for n in names], [grads_real[n] for n in names], leading=1)


def debiased_matching_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    aligned_images: Tensor,
    repulsion: float,
    valid: Tensor | None = None,
    class_gradients: ClassGradients | None = None,
    runner: NetworkRunner | None = None,
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
    runner = runner or NetworkRunner(net, FP32, real_images.device)
    num_classes, device = real_images.shape[0], real_images.device
    grads_real = class_gradients(
        runner, real_images, _class_targets(num_classes, real_images.shape[1], device), False
    )
    grads_aligned = class_gradients(
        runner, aligned_images, _class_targets(num_classes, aligned_images.shape[1], device), False
    )
    grads_syn = class_gradients(
        runner, syn_images, _class_targets(num_classes, syn_images.shape[1], device), True
    )
    names = list(grads_real)
    syn_list = [grads_syn[n] for n in names]
    attraction = gradient_distance_per_class(syn_list, [grads_real[n] for n in names])
    repelled = gradient_distance_per_class(syn_list, [grads_aligned[n] for n in names])
    if valid is not None:
        repelled = repelled * valid.to(repelled.dtype)
    return (attraction - repulsion * repelled).sum()


class GroupGradients:
    """Per (class, group) gradients {name: (K, G, *shape)} of the mean CE over each group's images in
    class c's real batch, for the weights of ndim > 1, and the (K, G) bool mask of the groups present.

    `way`: "vmap" (one forward per class, a vmapped backward per group; accelerators), "hooks" (one eager
    forward and backward per class, then every image's weight gradients from its layer inputs and output
    gradients, averaged per group: images do not interact in the network, so these are exactly the
    groups' gradients; the CPU), or "loop" (each group's images through the network on their own; any
    network).
    None picks vmap on accelerators, else hooks where the network's matched weights are all stride-1
    convolutions and linear layers, else loop."""

    def __init__(self, way: Literal["vmap", "hooks", "loop"] | None = None) -> None:
        self.way = way

    def __call__(
        self, runner: NetworkRunner, images: Tensor, labels: Tensor, groups: Tensor, num_groups: int
    ) -> tuple[dict, Tensor]:
        """images (K, n, C, H, W), labels and groups (K, n); no graph (a constant target)."""
        present = F.one_hot(groups.long(), num_groups).sum(1) > 0  # (K, G)
        way = self.way
        if way is None:
            way = "vmap" if images.device.type != "cpu" else ("hooks" if _hookable(runner.net) else "loop")
        if way == "vmap":
            return _group_batched(runner, images, labels, groups, num_groups), present
        if way == "hooks":
            return _group_hooked(runner, images, labels, groups, num_groups), present
        return _group_looped(runner, images, labels, groups, num_groups), present


def _hookable(net: nn.Module) -> bool:
    """Whether every matched weight is the weight of a plain stride-1 convolution or a linear layer."""
    for name in matched_names(net):
        owner, _, kind = name.rpartition(".")
        module = net.get_submodule(owner)
        if kind != "weight" or not isinstance(module, (nn.Conv2d, nn.Linear)):
            return False
        if isinstance(module, nn.Conv2d) and (
            module.stride != (1, 1) or module.dilation != (1, 1) or module.groups != 1
        ):
            return False
    return True


def _group_hooked(
    runner: NetworkRunner, images: Tensor, labels: Tensor, groups: Tensor, num_groups: int
) -> dict:
    net = runner.net
    names = matched_names(net)
    modules = [net.get_submodule(name.rpartition(".")[0]) for name in names]
    num_classes = images.shape[0]
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen[module] = (inputs[0].detach(), output)

    per_class: list[list[Tensor]] = []
    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        for c in range(num_classes):
            seen.clear()
            with torch.enable_grad(), runner.compute.autocast(images.device):
                logits = full_precision(net(images[c].detach()))
            loss = F.cross_entropy(logits, labels[c], reduction="sum")  # each image's own gradient
            deltas = torch.autograd.grad(loss, [seen[module][1] for module in modules])
            one_hot = F.one_hot(groups[c].long(), num_groups).T  # (G, n)
            mean_over = one_hot / one_hot.sum(1, keepdim=True).clamp_min(1)  # a group's mean; 0 if absent
            grads = []
            for module, delta in zip(modules, deltas, strict=True):
                dtype = module.weight.dtype  # bf16 activations under autocast: sums in full precision
                inputs, delta = seen[module][0].to(dtype), delta.to(dtype)
                if isinstance(module, nn.Linear):  # per image: delta_i outer input_i
                    per_image = delta.flatten(0, -2)[:, :, None] * inputs.flatten(0, -2)[:, None, :]
                else:  # per image: delta_i (out, pixels) @ unfolded input patches_i (pixels, in * k * k)
                    patches = F.unfold(inputs, module.kernel_size, padding=module.padding)
                    per_image = torch.bmm(delta.flatten(2), patches.transpose(1, 2))
                grads.append(
                    (mean_over.to(dtype) @ per_image.flatten(1)).view(num_groups, *module.weight.shape)
                )
            per_class.append(grads)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.stack([grads[i] for grads in per_class]) for i, name in enumerate(names)}


def _group_batched(
    runner: NetworkRunner, images: Tensor, labels: Tensor, groups: Tensor, num_groups: int
) -> dict:
    net = runner.net
    matched, others = _split_params(net)
    one_hot = F.one_hot(groups.long(), num_groups).to(images.dtype).transpose(1, 2)  # (K, G, n)
    weights = one_hot / one_hot.sum(-1, keepdim=True).clamp_min(1)  # each group's mean over its images

    def class_groups(params: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> dict[str, Tensor]:
        def per_sample(p: dict[str, Tensor]) -> Tensor:
            logits = full_precision(functional_call(net, {**p, **others}, (x,)))
            return F.cross_entropy(logits, y, reduction="none")  # (n,)

        _, pullback = vjp(per_sample, params)
        return vmap(pullback)(w)[0]  # {name: (G, *shape)}

    with torch.no_grad(), runner.compute.autocast(images.device):
        return vmap(class_groups, in_dims=(None, 0, 0, 0))(matched, images, labels, weights)


def _group_looped(
    runner: NetworkRunner, images: Tensor, labels: Tensor, groups: Tensor, num_groups: int
) -> dict:
    net = runner.net
    names = matched_names(net)
    params = [net.get_parameter(name) for name in names]
    if not all(p.requires_grad for p in params):
        raise ValueError("per-group gradients: the network's weights must require grad")
    num_classes = images.shape[0]
    out = {
        name: torch.zeros(num_classes, num_groups, *p.shape, device=p.device, dtype=p.dtype)
        for name, p in zip(names, params, strict=True)
    }
    for c in range(num_classes):
        for g in torch.unique(groups[c]).tolist():
            chosen = groups[c] == g
            with torch.enable_grad(), runner.compute.autocast(images.device):
                logits = full_precision(net(images[c][chosen].detach()))
            loss = F.cross_entropy(logits, labels[c][chosen])
            for name, grad_ in zip(names, torch.autograd.grad(loss, params), strict=True):
                out[name][c, g] = grad_.detach()
    return out


def synchronized_matching_loss(
    net: nn.Module,
    real_images: Tensor,
    syn_images: Tensor,
    groups: Tensor,
    num_groups: int,
    class_gradients: ClassGradients | None = None,
    group_gradients: GroupGradients | None = None,
    runner: NetworkRunner | None = None,
) -> Tensor:
    """FairDD's synchronized DC (Zhou et al. 2025, `main_DC.py`): sum_c sum_{g in batch_c} D(g_S, g_g).

    g_g: the gradient of the mean CE over class c's real images of group g (`groups` (K, n)), g_S: of c's
    synthetic images (once per class, differentiable wrt `syn_images`); D = DC's gradient distance. Each
    group in the batch weighs the same, however few images it has.
    """
    class_gradients = class_gradients or ClassGradients()
    group_gradients = group_gradients or GroupGradients()
    runner = runner or NetworkRunner(net, FP32, real_images.device)
    num_classes, device = real_images.shape[0], real_images.device
    targets = _class_targets(num_classes, real_images.shape[1], device)
    grads_real, present = group_gradients(runner, real_images, targets, groups, num_groups)
    grads_syn = class_gradients(
        runner, syn_images, _class_targets(num_classes, syn_images.shape[1], device), True
    )
    names = list(grads_real)
    syn_list = [grads_syn[n].unsqueeze(1).expand_as(grads_real[n]) for n in names]
    total: Tensor | None = None
    for term in _row_distances(syn_list, [grads_real[n] for n in names], leading=2):  # (K, G, rows)
        per_group = term.sum(-1)
        total = per_group if total is None else total + per_group
    assert total is not None  # _row_distances raises on a network without weights to match
    return (total * present.to(total.dtype)).sum()


# --- network updates on the synthetic set -----------------------------------------------------------


def train_network(
    runner: NetworkRunner,
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
            loss = F.cross_entropy(runner.forward(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


# --- the matcher --------------------------------------------------------------------------------------


class GradientMatching:
    """DC's part of an outer iteration: `outer_loop` matching steps, training in between (with per-sample
    DSA when the context has a DSAConfig: that is DSA)."""

    def __init__(self, cfg: GradientMatchingConfig, context: Context) -> None:
        self.cfg = cfg
        self.context = context
        self.steps = cfg.outer_loop
        self.class_gradients = ClassGradients()
        self.group_gradients = GroupGradients()
        self.optimizer: torch.optim.Optimizer | None = None

    def start(self, runner: NetworkRunner) -> None:
        runner.net.train()
        runner.net.requires_grad_(True)
        self.optimizer = torch.optim.SGD(runner.net.parameters(), lr=self.cfg.lr_net)

    def loss(self, runner: NetworkRunner, batch: Batch) -> Tensor:
        sampling = self.context.sampling
        if batch.groups is not None:
            return synchronized_matching_loss(
                runner.net,
                batch.real,
                batch.syn,
                batch.groups,
                self.context.num_classes,  # (pseudo-)attributes share the classes' range
                self.class_gradients,
                self.group_gradients,
                runner,
            )
        if batch.aligned is None:
            return matching_loss(runner.net, batch.real, batch.syn, self.class_gradients, runner)
        return debiased_matching_loss(
            runner.net,
            batch.real,
            batch.syn,
            batch.aligned,
            sampling.repulsion,
            sampling.aligned_valid,
            self.class_gradients,
            runner,
        )

    def between(self, runner: NetworkRunner, syn: Tensor) -> None:
        assert self.optimizer is not None  # set by start()
        context = self.context
        train_network(
            runner,
            self.optimizer,
            syn,
            context.syn_labels,
            self.cfg.inner_loop,
            self.cfg.batch_train,
            context.generator,
            context.dsa,
        )
