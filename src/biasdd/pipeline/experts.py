"""The `experts@<method>` stage: the expert trajectories a method distils from (MTT), or a note that it
needs none (docs/protocol.md §6, MTT).

`configure(params, method)` validates every param the stage reads, before any work, for every method
(one params list serves every `experts@<method>`). For a method in `vocab.EXPERT_METHODS`, `run` trains
`experts.num_experts` networks of `model` on the biased training split with the reference's settings
(`buffer.py`: SGD at `lr_teacher`, per-sample DSA, no learning-rate decay) and records every expert's flat
parameters before its first epoch and after each epoch; a checkpoint after every epoch lets a killed run
resume to the same bytes. `trajectory_groups` lays out `data/experts/<method>.h5`; `NO_EXPERTS` is the
whole artifact of a method that needs none: it records only that, so its bytes depend on nothing else
(an edit of this code re-runs `experts@dm`, whose unchanged output then re-runs nothing downstream).

This module imports no distillation code: an edit of a distillation method must not retrain experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from biasdd import artifacts
from biasdd.config import Config, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, from_dict, section
from biasdd.errors import ConfigError
from biasdd.training.augment import DSAConfig, dsa_augment, dsa_config
from biasdd.training.compute import NetworkRunner
from biasdd.training.data import load_split, train_stats
from biasdd.training.runtime import RunConfig, derive_seed, net_factory, run_config, start
from biasdd.training.trainer import train_epoch
from biasdd.vocab import EXPERT_METHODS, METHODS

log = logging.getLogger(__name__)

NO_EXPERTS = {"needs_experts": False}  # the attributes of a method's artifact when it needs no experts


@dataclass(frozen=True)
class ExpertsConfig(Config):
    """The `experts` params section: how the experts train (reference `buffer.py`; docs/protocol.md §6)."""

    SECTION: ClassVar[str] = "experts"

    num_experts: PositiveInt  # experts trained (buffer.py's default: 100)
    epochs: PositiveInt  # epochs each, recorded after each (the MTT README: 50)
    lr_teacher: PositiveFloat  # SGD learning rate (buffer.py: 0.01), constant (no --decay)
    momentum: Fraction  # SGD momentum (buffer.py --mom: 0)
    weight_decay: NonNegativeFloat  # SGD weight decay (buffer.py --l2: 0)
    batch_size: PositiveInt  # images per step, a new shuffle each epoch (buffer.py --batch_train: 256)


@dataclass(frozen=True)
class ExpertsSetup:
    method: str
    needed: bool  # whether the method distils from expert trajectories
    run: RunConfig
    cfg: ExpertsConfig
    dsa: DSAConfig

    def provenance(self) -> dict[str, Any]:
        return {
            "method": self.method,
            **self.run.provenance(),
            "experts": dataclasses.asdict(self.cfg),
            "dsa": dataclasses.asdict(self.dsa),
        }


def configure(params: Mapping[str, Any], method: str) -> ExpertsSetup:
    """Validate every param the experts@<method> stage reads (the same params for every method)."""
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not valid; choose one of {sorted(METHODS)}")
    run = run_config(params)
    cfg = from_dict(ExpertsConfig, section(params, "experts"), "experts")
    dsa = dsa_config(params, run.dataset)
    return ExpertsSetup(method, method in EXPERT_METHODS, run, cfg, dsa)


@dataclass
class ExpertRun:
    """The experts' recorded trajectories, in expert order."""

    params: list[Tensor]  # per expert (epochs + 1, P) float32 on CPU
    losses: list[Tensor]  # per expert (epochs,) float64: mean training cross-entropy of each epoch
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def flat_parameters(net: nn.Module) -> Tensor:
    """(P,) float32 on CPU: the parameters concatenated in `named_parameters` order."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).to("cpu", torch.float32)


def checkpoint_path(checkpoint_dir: Path, method: str, expert: int | None = None) -> Path:
    """The running expert's checkpoint (`expert` None), or a finished expert's trajectory."""
    return checkpoint_dir / (f"experts_{method}.pt" if expert is None else f"experts_{method}_{expert}.pt")


def run(
    setup: ExpertsSetup,
    data_path: Path,
    checkpoint_dir: Path | None,
    progress: bool = True,
    on_epoch: Callable[[int, int], None] | None = None,
) -> ExpertRun:
    """Train the experts, resuming from checkpoints made by the same params on the same data.

    Expert k: a fresh network from its own generator (seed `derive_seed(seed, "experts", k)`), which
    also draws its data order and augmentation; SGD for `epochs` epochs; its flat parameters recorded
    before training and after every epoch. After every epoch the running expert's state (network,
    optimiser, generator, trajectory so far) is checkpointed; a finished expert's trajectory is kept in
    a file of its own. Compilation runs from the first call (`compile_after=1`), so a resumed run
    computes exactly what an uninterrupted one does. `on_epoch(expert, epoch)` is called after each
    epoch's checkpoint (tests interrupt there).
    """
    setup = dataclasses.replace(setup, run=start(setup.run))  # the device: leased now, not when validated
    cfg, device = setup.cfg, setup.run.device
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    images, labels = train.images.to(device), train.labels.to(device)
    factory = net_factory(setup.run, images.shape[1], images.shape[-1])
    identity = {**setup.provenance(), "data": artifacts.md5_file(data_path)}
    identity.pop("method")  # the experts do not depend on which method reads them
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    dsa = setup.dsa

    def augment(batch: Tensor, generator: torch.Generator) -> Tensor:
        return dsa_augment(batch, dsa, generator, groups=None)  # per sample (the reference's DiffAugment)

    work: nn.Module | None = None
    runner: NetworkRunner | None = None
    out = ExpertRun([], [], (), ())
    for expert in range(cfg.num_experts):
        generator = torch.Generator().manual_seed(derive_seed(setup.run.seed, "experts", expert))
        fresh = factory(generator)
        if work is None:
            work, runner = fresh, NetworkRunner(fresh, setup.run.compute, device, compile_after=1)
            named = list(work.named_parameters())
            out.names, out.shapes = tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named)
        else:
            work.load_state_dict(fresh.state_dict())  # the same module: its compiled code is reused
        assert runner is not None
        work.train()
        optimizer = torch.optim.SGD(
            work.parameters(), lr=cfg.lr_teacher, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        done = _load_finished(checkpoint_dir, setup.method, expert, fingerprint)
        if done is not None:
            out.params.append(done["params"])
            out.losses.append(done["losses"])
            continue
        snapshots, losses, first = [flat_parameters(work)], [], 0
        saved = _load_running(checkpoint_dir, setup.method, expert, fingerprint)
        if saved is not None:
            work.load_state_dict(saved["net"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            snapshots, losses, first = list(saved["params"]), list(saved["losses"]), saved["epoch"]
            log.info("resuming expert %d from epoch %d", expert, first)
        bar = tqdm(
            range(first, cfg.epochs),
            initial=first,
            total=cfg.epochs,
            desc=f"expert {expert + 1}/{cfg.num_experts}",
            disable=None if progress else True,
            leave=False,
        )
        for epoch in bar:
            loss = train_epoch(runner, optimizer, images, labels, cfg.batch_size, generator, augment)
            snapshots.append(flat_parameters(work))  # a CPU copy: one sync per epoch
            losses.append(float(loss))
            if checkpoint_dir is not None:
                state = {
                    "fingerprint": fingerprint,
                    "expert": expert,
                    "epoch": epoch + 1,
                    "net": artifacts.to_cpu(work.state_dict()),
                    "optimizer": artifacts.to_cpu(optimizer.state_dict()),
                    "generator": generator.get_state(),
                    "params": snapshots,
                    "losses": losses,
                }
                artifacts.save_checkpoint(checkpoint_path(checkpoint_dir, setup.method), state)
            if on_epoch is not None:
                on_epoch(expert, epoch + 1)
        bar.close()
        trajectory, epoch_losses = torch.stack(snapshots), torch.tensor(losses, dtype=torch.float64)
        log.info("expert %d: last epoch's training loss %.4f", expert, losses[-1] if losses else float("nan"))
        if checkpoint_dir is not None:
            finished = {"fingerprint": fingerprint, "params": trajectory, "losses": epoch_losses}
            artifacts.save_checkpoint(checkpoint_path(checkpoint_dir, setup.method, expert), finished)
        out.params.append(trajectory)
        out.losses.append(epoch_losses)
    return out


def _load(path: Path, fingerprint: str) -> dict[str, Any] | None:
    saved = artifacts.load_checkpoint(path)
    if saved is not None and saved.get("fingerprint") != fingerprint:
        log.info("ignoring %s: made by other params or data", path)
        return None
    return saved


def _load_finished(checkpoint_dir: Path | None, method: str, expert: int, fingerprint: str) -> dict | None:
    if checkpoint_dir is None:
        return None
    saved = _load(checkpoint_path(checkpoint_dir, method, expert), fingerprint)
    if saved is not None:
        log.info("expert %d: finished before, read from its checkpoint", expert)
    return saved


def _load_running(checkpoint_dir: Path | None, method: str, expert: int, fingerprint: str) -> dict | None:
    if checkpoint_dir is None:
        return None
    saved = _load(checkpoint_path(checkpoint_dir, method), fingerprint)
    return saved if saved is not None and saved["expert"] == expert else None


def remove_checkpoints(checkpoint_dir: Path, method: str, num_experts: int) -> None:
    """Done: the checkpoints are spent."""
    checkpoint_path(checkpoint_dir, method).unlink(missing_ok=True)
    for expert in range(num_experts):
        checkpoint_path(checkpoint_dir, method, expert).unlink(missing_ok=True)


def trajectory_groups(experts: ExpertRun) -> dict[str, dict[str, np.ndarray]]:
    """The groups of `data/experts/<method>.h5`: `trajectories` with `params` (E, T + 1, P) float32 (expert
    e's flat parameters before training and after each epoch, in the order of `param_names`) and `loss`
    (E, T) float64 (each epoch's mean training cross-entropy)."""
    return {
        "trajectories": {
            "params": torch.stack(experts.params).numpy().astype(np.float32),
            "loss": torch.stack(experts.losses).numpy().astype(np.float64),
        }
    }


def trajectory_attrs(experts: ExpertRun) -> dict[str, Any]:
    """What reads the flat vectors back: the parameters' names and shapes, in order."""
    return {
        "needs_experts": True,
        "param_names": list(experts.names),
        "param_shapes": [list(s) for s in experts.shapes],
        "num_experts": len(experts.params),
        "epochs": int(experts.params[0].shape[0] - 1) if experts.params else 0,
    }
