"""biasdd's DM, DC and DSA against a plain per-class implementation of the same algorithm, side by side
in one process, at the same settings; prints seconds per (outer) iteration and the ratio.

The per-class implementation is written here the way the field's reference code is written (Zhao &
Bilen's DatasetCondensation `main.py` / `main_DM.py`): a fresh network module every outer iteration, a
Python loop over classes, per class one siamese DSA call over its real and synthetic images, per class
`torch.autograd.grad` on the real batch and (with `create_graph`) on the synthetic images for DC/DSA,
and the network's inner-loop training on the synthetic set batch by batch. It uses biasdd's DSA ops and
ConvNet, so the difference is the structure and the compute settings alone.

    python benchmarks/speed_vs_reference.py                      # quick settings, all three, ~10 min
    python benchmarks/speed_vs_reference.py --methods dm --levers  # DM: each lever measured on its own
    python benchmarks/speed_vs_reference.py --methods mtt --reference-dir /tmp/mtt-ref   # MTT, ~3 min

MTT is timed against the reference's OWN code (Cazenavette et al., github.com/GeorgeCazenavette/
mtt-distillation), which this repository does not contain: extract it first, e.g.
`git clone https://github.com/GeorgeCazenavette/mtt-distillation /tmp/mtt-ref`, and pass the folder as
`--reference-dir`. The script imports its `reparam_module.ReparamModule`, `networks.ConvNet` (through
`utils.get_network`), `utils.DiffAugment` and `utils.epoch`, and reproduces, with them, one iteration of
`distill.py`'s loop (a fresh `ReparamModule` student, `syn_steps` steps with `create_graph`, the image
and step-size updates; `--load_all`'s random expert) and one training epoch of `buffer.py`'s expert loop
(its DataLoader and `epoch('train', ..., aug=True)`; buffer.py's test pass after each epoch is not
timed, biasdd has none). `utils.py` imports kornia only for ZCA; where kornia is not installed a stub
stands in, which fails if anything uses it. Shapes: 3x32x32 (CCIFAR10-DD; the reference's ConvNet
sizes its classifier for 32x32, so 28x28 three-channel inputs do not fit it, docs/protocol.md §5).
biasdd's side: `METHODS["mtt"]` (per-iteration times from checkpoint stamps) and the experts stage's
epoch (`trainer.train_epoch` through a `NetworkRunner` compiled from the first call).

Quick settings (the defaults): ConvNet-3 width 32, IPC 10, batch_real 64, CMNIST-DD shape 3x28x28
(padded to 32x32 in the first conv), DC/DSA outer_loop 10 / inner_loop 50 (the reference's IPC-10 loops);
biasdd with `compute` = bf16 + torch.compile (the quick budget's), and, as a second row, fp32 eager.
Blocks of iterations alternate (reference, biasdd, reference, ...) for `--rounds` rounds; the first
`--warmup` (DM) / `--gm-warmup` (DC, DSA) iterations of each biasdd block (compilation) are dropped;
figures are medians.

The allocator: glibc serves large allocations with fresh mmap'd pages (page faults on every touch)
until a large block has been freed, which raises its mmap threshold for the rest of the process. So
the per-class reference, timed in a process where biasdd had not yet run, measured 0.22 s per DM
iteration, and 0.13-0.15 s once biasdd's large blocks had been freed, a state biasdd itself always runs
in. To time both sides in the same state the script re-runs itself with glibc's thresholds fixed
(`MALLOC_MMAP_THRESHOLD_` 32 MiB, `MALLOC_TRIM_THRESHOLD_` 64 MiB: the values biasdd's training stages
set on the CPU, `biasdd.training.compute.tune_cpu_allocator`); `--default-allocator` keeps the
environment as it is (benchmarks/RESULTS.md has both).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biasdd.distill import METHODS, mtt
from biasdd.training import compute
from biasdd.training.augment import DSAConfig, dsa_augment
from biasdd.training.compute import ComputeConfig, NetworkRunner
from biasdd.training.nets import build_network
from biasdd.training.trainer import train_epoch

K = 10
ALLOCATOR_ENV = {name: str(value) for name, value in compute.ALLOCATOR_THRESHOLDS.items()}
DSA = DSAConfig("color_crop_cutout_scale_rotate", 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)  # digits: no flip


# --- the per-class reference -------------------------------------------------------------------------


class Reference:
    """The reference's structure: per-class loops, a fresh module per outer iteration, fp32 eager."""

    def __init__(
        self, method: str, real: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace
    ) -> None:
        self.method, self.real, self.args = method, real, args
        self.by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(K)]
        self.generator = torch.Generator().manual_seed(1)
        init = torch.cat([self.by_class[c][: args.ipc] for c in range(K)])
        self.syn = real[init].clone().requires_grad_(True)  # real init
        lr = 1.0 if method == "dm" else 0.1
        self.optimizer = torch.optim.SGD([self.syn], lr=lr, momentum=0.5)
        self.dsa = None if method == "dc" else DSA

    def _net(self) -> torch.nn.Module:
        return build_network("convnet3", 3, K, self.real.shape[-1], self.args.width, generator=self.generator)

    def _batch(self, c: int) -> torch.Tensor:
        index = self.by_class[c][torch.randperm(len(self.by_class[c]), generator=self.generator)]
        return self.real[index[: self.args.batch_real]]

    def _siamese(self, real: torch.Tensor, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dsa is None:
            return real, syn
        both = dsa_augment(
            torch.cat([real, syn]),
            self.dsa,
            self.generator,
            groups=torch.zeros(len(real) + len(syn), dtype=torch.long),
        )
        return both[: len(real)], both[len(real) :]

    def iteration(self) -> None:
        if self.method == "dm":
            self._dm()
        else:
            self._gradient_matching()

    def _dm(self) -> None:
        ipc = self.args.ipc
        net = self._net()
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        loss = torch.tensor(0.0)
        for c in range(K):
            real, syn = self._siamese(self._batch(c), self.syn[c * ipc : (c + 1) * ipc])
            out_real = net.embed(real).detach()
            out_syn = net.embed(syn)
            loss = loss + torch.sum((out_real.mean(0) - out_syn.mean(0)) ** 2)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def _gradient_matching(self) -> None:
        args, ipc = self.args, self.args.ipc
        net = self._net()
        net.train()
        params = list(net.parameters())
        optimizer_net = torch.optim.SGD(net.parameters(), lr=0.01)
        syn_labels = torch.arange(K).repeat_interleave(ipc)
        for outer in range(args.outer_loop):
            loss = torch.tensor(0.0)
            for c in range(K):
                real, syn = self._siamese(self._batch(c), self.syn[c * ipc : (c + 1) * ipc])
                label_real = torch.full((len(real),), c)
                label_syn = torch.full((ipc,), c)
                g_real = torch.autograd.grad(F.cross_entropy(net(real), label_real), params)
                g_real = [g.detach() for g in g_real]
                g_syn = torch.autograd.grad(F.cross_entropy(net(syn), label_syn), params, create_graph=True)
                loss = loss + _match_loss(g_syn, g_real)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if outer == args.outer_loop - 1:
                break
            syn_train = self.syn.detach().clone()
            for _ in range(args.inner_loop):  # the reference's epoch('train', ...) on the synthetic set
                order = torch.randperm(len(syn_train), generator=self.generator)
                for start in range(0, len(order), 256):
                    index = order[start : start + 256]
                    x = syn_train[index]
                    if self.dsa is not None:
                        x = dsa_augment(x, self.dsa, self.generator)
                    batch_loss = F.cross_entropy(net(x), syn_labels[index])
                    optimizer_net.zero_grad()
                    batch_loss.backward()
                    optimizer_net.step()


def _match_loss(g_syn: list[torch.Tensor], g_real: list[torch.Tensor]) -> torch.Tensor:
    """The reference's match_loss with distance_wb: 1 - cosine per output row; 1-d tensors ignored."""
    total = torch.tensor(0.0)
    for gs, gr in zip(g_syn, g_real, strict=True):
        if gr.ndim == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        total = total + torch.sum(1 - torch.sum(gr * gs, dim=-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6))
    return total


# --- biasdd -----------------------------------------------------------------------------------------------


def biasdd_block(
    method: str,
    real: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    setting: ComputeConfig,
    n: int,
) -> list[float]:
    """Seconds of each of `n` outer iterations of one biasdd run (the first `args.warmup` dropped)."""
    warmup = args.warmup if method == "dm" else args.gm_warmup
    values = dict(
        ipc=args.ipc, iterations=n + warmup, batch_real=args.batch_real, momentum_img=0.5, init="real"
    )
    if method == "dm":
        values["lr_img"] = 1.0
    else:
        values.update(
            lr_img=0.1, outer_loop=args.outer_loop, inner_loop=args.inner_loop, lr_net=0.01, batch_train=256
        )
    cfg = METHODS[method].config(**values)
    stamps = [time.perf_counter()]

    def factory(g: torch.Generator) -> torch.nn.Module:
        return build_network("convnet3", 3, K, real.shape[-1], args.width, generator=g)

    METHODS[method](
        real,
        labels,
        K,
        cfg,
        factory,
        torch.Generator().manual_seed(0),
        dsa=DSA,
        compute=setting,
        progress=False,
        checkpoint_every=1,
        on_checkpoint=lambda state: stamps.append(time.perf_counter()),
    )
    deltas = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return deltas[warmup:]


def reference_block(ref: Reference, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        ref.iteration()
        out.append(time.perf_counter() - start)
    return out


def print_rows(what: str, baseline: str, times: dict[str, list[float]]) -> None:
    """One table row per biasdd setting: the medians of `times` ("reference" and one list a setting)."""
    reference = statistics.median(times["reference"])
    for name, values in times.items():
        if name != "reference":
            median = statistics.median(values)
            print(
                f"| {what} | {baseline} | {reference:.3f} s | biasdd {name} | {median:.3f} s | "
                f"{reference / median:.2f}x |",
                flush=True,
            )


def compare(method: str, args: argparse.Namespace, real: torch.Tensor, labels: torch.Tensor) -> None:
    n = args.dm_iterations if method == "dm" else args.gm_iterations
    settings = {"bf16+compile": ComputeConfig("bf16", True), "fp32 eager": ComputeConfig("fp32", False)}
    ref = Reference(method, real, labels, args)
    reference_block(ref, 1)  # warm-up: allocator, first calls
    times: dict[str, list[float]] = {"reference": [], **{k: [] for k in settings}}
    for _ in range(args.rounds):
        times["reference"] += reference_block(ref, n)
        for name, setting in settings.items():
            times[name] += biasdd_block(method, real, labels, args, setting, n)
    print_rows(method, "per-class reference (fp32 eager)", times)


def levers(args: argparse.Namespace, real: torch.Tensor, labels: torch.Tensor) -> None:
    """DM, one lever at a time on top of the previous ones."""
    steps: list[tuple[str, ComputeConfig, int]] = [
        ("one pass per side (no chunks), fp32, eager", ComputeConfig("fp32", False), 0),
        ("+ cache-sized chunks (128 images)", ComputeConfig("fp32", False), compute.CPU_CHUNK),
        ("+ bf16 autocast", ComputeConfig("bf16", False), compute.CPU_CHUNK),
        ("+ torch.compile (fused norm/ReLU/pool)", ComputeConfig("bf16", True), compute.CPU_CHUNK),
    ]
    original = compute.CPU_CHUNK
    results = {name: [] for name, _, _ in steps}
    try:
        for _ in range(args.rounds):
            for name, setting, chunk in steps:
                compute.CPU_CHUNK = chunk
                results[name] += biasdd_block("dm", real, labels, args, setting, args.dm_iterations)
    finally:
        compute.CPU_CHUNK = original
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        deltas = biasdd_block("dm", real, labels, args, ComputeConfig("bf16", True), args.dm_iterations)
        results[f"all of the above, {threads} thread(s)"] = deltas
    base = statistics.median(results[steps[0][0]])
    for name, deltas in results.items():
        median = statistics.median(deltas)
        print(f"| DM lever | {name} | {1e3 * median:.1f} ms | {base / median:.2f}x |", flush=True)


# --- MTT against the reference's own code --------------------------------------------------------------

MTT_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # the reference's default (CIFAR-10: with flip)


def reference_modules(folder: Path) -> types.SimpleNamespace:
    """The reference's modules, imported from `folder` (a clone of mtt-distillation)."""
    if not (folder / "distill.py").is_file() or not (folder / "reparam_module.py").is_file():
        raise SystemExit(
            f"speed_vs_reference: --reference-dir {folder}: no MTT reference there (distill.py, "
            "reparam_module.py); extract it: git clone https://github.com/GeorgeCazenavette/mtt-distillation "
            f"{folder}"
        )
    try:
        importlib.import_module("kornia")
    except ImportError:  # utils.py imports kornia for ZCA only, which is not timed here

        def unused(name: str) -> None:
            raise AttributeError(f"kornia.{name}: a stub (kornia is not installed); ZCA is not benchmarked")

        stub = types.ModuleType("kornia")
        stub.__getattr__ = unused  # type: ignore[attr-defined]
        sys.modules["kornia"] = stub
    sys.path.insert(0, str(folder))
    return types.SimpleNamespace(
        utils=importlib.import_module("utils"), reparam=importlib.import_module("reparam_module")
    )


class ReferenceMTT:
    """distill.py's iteration and buffer.py's training epoch, with the reference's own modules."""

    def __init__(self, ref: types.SimpleNamespace, args: argparse.Namespace, buffer: list) -> None:
        self.ref, self.args, self.buffer = ref, args, buffer
        self.model = "ConvNet" if args.width == 128 else f"ConvNetW{args.width}"
        self.im_size = (args.size, args.size)
        self.dsa_param = ref.utils.ParamDiffAug()
        num_images = K * args.ipc
        self.image_syn = torch.randn(num_images, 3, args.size, args.size).requires_grad_(True)
        self.label_syn = torch.arange(K).repeat_interleave(args.ipc)
        self.syn_lr = torch.tensor(0.01).requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=1000.0, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=1e-5, momentum=0.5)
        self.batch_syn = args.batch_syn or num_images
        self.criterion = torch.nn.CrossEntropyLoss()

    def iteration(self) -> None:
        """distill.py's loop body (evaluation and logging aside)."""
        args, utils = self.args, self.ref.utils
        student_net = self.ref.reparam.ReparamModule(
            utils.get_network(self.model, 3, K, self.im_size, dist=False)
        )
        student_net.train()
        num_params = sum(np.prod(p.size()) for p in student_net.parameters())
        expert_trajectory = self.buffer[np.random.randint(0, len(self.buffer))]
        start_epoch = np.random.randint(0, args.max_start_epoch)
        starting_params = expert_trajectory[start_epoch]
        target_params = expert_trajectory[start_epoch + args.expert_epochs]
        target_params = torch.cat([p.data.reshape(-1) for p in target_params], 0)
        student_params = [torch.cat([p.data.reshape(-1) for p in starting_params], 0).requires_grad_(True)]
        starting_params = torch.cat([p.data.reshape(-1) for p in starting_params], 0)
        indices_chunks: list = []
        for _ in range(args.syn_steps):
            if not indices_chunks:
                indices = torch.randperm(len(self.image_syn))
                indices_chunks = list(torch.split(indices, self.batch_syn))
            these_indices = indices_chunks.pop()
            x = self.image_syn[these_indices]
            this_y = self.label_syn[these_indices]
            x = utils.DiffAugment(x, MTT_STRATEGY, param=self.dsa_param)
            x = student_net(x, flat_param=student_params[-1])
            ce_loss = self.criterion(x, this_y)
            grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - self.syn_lr * grad)
        param_loss = F.mse_loss(student_params[-1], target_params, reduction="sum") / num_params
        param_dist = F.mse_loss(starting_params, target_params, reduction="sum") / num_params
        grand_loss = param_loss / param_dist
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        grand_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()

    def expert_epoch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One training epoch of buffer.py's loop: a fresh teacher, SGD(0.01, mom 0, l2 0), its DataLoader."""
        utils = self.ref.utils
        epoch_args = types.SimpleNamespace(
            device="cpu", dsa=True, dsa_strategy=MTT_STRATEGY, dsa_param=self.dsa_param, dataset="CIFAR10"
        )
        loader = torch.utils.data.DataLoader(
            utils.TensorDataset(images, labels), batch_size=256, shuffle=True, num_workers=0
        )
        teacher_net = utils.get_network(self.model, 3, K, self.im_size).to("cpu")
        teacher_net.train()
        teacher_optim = torch.optim.SGD(teacher_net.parameters(), lr=0.01, momentum=0, weight_decay=0)
        utils.epoch("train", dataloader=loader, net=teacher_net, optimizer=teacher_optim,
                    criterion=self.criterion, args=epoch_args, aug=True)  # fmt: skip


def stand_in_buffer(args: argparse.Namespace) -> list:
    """Expert trajectories in the reference's buffer format (per expert, per epoch, the parameter tensors),
    random steps from a fresh network's init: the iteration's cost does not depend on their values."""
    generator = torch.Generator().manual_seed(3)
    net = build_network("convnet3", 3, K, args.size, args.width, generator=generator)
    buffer = []
    for _ in range(2):
        params = [p.detach().clone() for p in net.parameters()]
        trajectory = [params]
        for _ in range(args.max_start_epoch + args.expert_epochs):
            params = [p + 0.01 * torch.randn(p.shape, generator=generator) for p in params]
            trajectory.append(params)
        buffer.append(trajectory)
    return buffer


def biasdd_mtt_block(args: argparse.Namespace, buffer: list, setting: ComputeConfig, n: int) -> list[float]:
    """Seconds of each of `n` MTT iterations of one biasdd run (the first `args.gm_warmup` dropped)."""
    net = build_network("convnet3", 3, K, args.size, args.width, generator=torch.Generator().manual_seed(0))
    flat = torch.stack(
        [torch.stack([torch.cat([p.reshape(-1) for p in epoch]) for epoch in t]) for t in buffer]
    )
    trajectories = mtt.Trajectories(flat, *mtt.layout(net))
    warmup = args.gm_warmup
    cfg = METHODS["mtt"].config(
        ipc=args.ipc, iterations=n + warmup, lr_img=1000.0, momentum_img=0.5, batch_real=256, init="real",
        syn_steps=args.syn_steps, expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
        lr_lr=1e-5, lr_teacher=0.01, batch_syn=args.batch_syn,
    )  # fmt: skip
    real = torch.randn(K * 50, 3, args.size, args.size, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(K).repeat_interleave(50)
    stamps = [time.perf_counter()]
    METHODS["mtt"](
        real, labels, K, cfg,
        lambda g: build_network("convnet3", 3, K, args.size, args.width, generator=g),
        torch.Generator().manual_seed(0), dsa=DSAConfig(MTT_STRATEGY, 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5),
        compute=setting, progress=False, upstream=trajectories, checkpoint_every=1,
        on_checkpoint=lambda state: stamps.append(time.perf_counter()),
    )  # fmt: skip
    deltas = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return deltas[warmup:]


def biasdd_expert_epochs(
    args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor, setting: ComputeConfig, n: int
) -> list[float]:
    """Seconds of each of `n` expert epochs as the experts stage trains them (one warm-up epoch dropped)."""
    generator = torch.Generator().manual_seed(5)
    net = build_network("convnet3", 3, K, args.size, args.width, generator=generator)
    runner = NetworkRunner(net, setting, "cpu", compile_after=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0, weight_decay=0)
    dsa = DSAConfig(MTT_STRATEGY, 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)
    net.train()
    out = []
    for _ in range(n + 1):
        start = time.perf_counter()
        loss = train_epoch(
            runner, optimizer, images, labels, 256, generator, lambda x, g: dsa_augment(x, dsa, g)
        )
        float(loss)  # the experts stage reads each epoch's loss
        out.append(time.perf_counter() - start)
    return out[1:]


def compare_mtt(args: argparse.Namespace) -> None:
    if args.reference_dir is None:
        raise SystemExit("speed_vs_reference: --methods mtt needs --reference-dir (see the docstring)")
    ref = ReferenceMTT(reference_modules(Path(args.reference_dir)), args, stand_in_buffer(args))
    settings = {"bf16+compile": ComputeConfig("bf16", True), "fp32 eager": ComputeConfig("fp32", False)}
    images = torch.randn(
        args.expert_images, 3, args.size, args.size, generator=torch.Generator().manual_seed(6)
    )
    labels = torch.arange(args.expert_images) % K
    ref.iteration()  # warm-up: allocator, first calls
    iterations: dict[str, list[float]] = {"reference": [], **{k: [] for k in settings}}
    epochs: dict[str, list[float]] = {"reference": [], **{k: [] for k in settings}}
    for _ in range(args.rounds):
        for _ in range(args.gm_iterations):
            start = time.perf_counter()
            ref.iteration()
            iterations["reference"].append(time.perf_counter() - start)
        for name, setting in settings.items():
            iterations[name] += biasdd_mtt_block(args, ref.buffer, setting, args.gm_iterations)
        start = time.perf_counter()
        ref.expert_epoch(images, labels)
        epochs["reference"].append(time.perf_counter() - start)
        for name, setting in settings.items():
            epochs[name] += biasdd_expert_epochs(args, images, labels, setting, 1)
    print_rows("MTT, s / iteration", "reference's own code (fp32 eager)", iterations)
    print_rows(f"expert, s / epoch of {args.expert_images}", "reference's own code (fp32 eager)", epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dm,dc,dsa", help="of dm, dc, dsa, mtt")
    parser.add_argument("--reference-dir", help="MTT: a clone of the reference's repository (see above)")
    parser.add_argument("--syn-steps", type=int, default=10, help="MTT: student steps (quick budget: 10)")
    parser.add_argument("--expert-epochs", type=int, default=1, help="MTT (quick budget: 1)")
    parser.add_argument("--max-start-epoch", type=int, default=2, help="MTT (quick budget: 2)")
    parser.add_argument("--batch-syn", type=int, default=None, help="MTT: images per step (default: all)")
    parser.add_argument("--expert-images", type=int, default=10000, help="MTT: images of an expert epoch")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--outer-loop", type=int, default=10)
    parser.add_argument("--inner-loop", type=int, default=50)
    parser.add_argument(
        "--size", type=int, default=None, help="28 (CMNIST-DD, default) or 32 (CCIFAR10-DD); MTT: 32"
    )
    parser.add_argument("--dm-iterations", type=int, default=20, help="timed DM iterations per block")
    parser.add_argument(
        "--gm-iterations", type=int, default=2, help="timed DC/DSA outer iterations per block"
    )
    parser.add_argument("--warmup", type=int, default=5, help="DM iterations dropped per biasdd block")
    parser.add_argument("--gm-warmup", type=int, default=1, help="DC/DSA outer iterations dropped per block")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levers", action="store_true", help="DM: measure each lever on its own")
    parser.add_argument(
        "--default-allocator", action="store_true", help="do not fix glibc's thresholds (see above)"
    )
    args = parser.parse_args()
    with_mtt = "mtt" in args.methods.split(",")
    if with_mtt and args.size not in (None, 32):
        raise SystemExit(
            "speed_vs_reference: MTT runs at --size 32 (the reference's ConvNet does not fit 3x28x28)"
        )
    args.size = args.size or (32 if with_mtt else 28)
    if not args.default_allocator and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; width {args.width}, IPC {args.ipc}, "
        f"allocator thresholds {'default' if args.default_allocator else 'fixed'}, "
        f"batch_real {args.batch_real}, "
        f"3x{args.size}x{args.size}, DC/DSA loops {args.outer_loop}/{args.inner_loop}",
        flush=True,
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(K).repeat_interleave(600)  # 6,000 images: the batches only need a pool
    real = torch.randn(len(labels), 3, args.size, args.size, generator=generator)
    print(
        "| method | baseline | s / iteration | biasdd | s / iteration | speed-up |\n|---|---|---|---|---|---|"
    )
    if args.levers:
        levers(args, real, labels)
        return
    for method in args.methods.split(","):
        if method == "mtt":
            compare_mtt(args)
        else:
            compare(method, args, real, labels)


if __name__ == "__main__":
    main()
