"""What every training stage shares: the dataset, seed, budget, device, network and compute settings.

`run_config(params)` validates the top-level keys and the `model` and `compute` sections once for the
stages that train networks (bias_model, bias_classifier, distill, evaluate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from biasdd.config import Config, NonNegativeInt, PositiveInt, from_dict, section
from biasdd.errors import ConfigError
from biasdd.training.compute import ComputeConfig, tune_cpu_allocator, warn_if_bf16_emulated
from biasdd.training.lease import lease_device
from biasdd.training.nets import NETWORKS, build_network
from biasdd.vocab import NUM_CLASSES, Budget, Dataset

DEVICES = ("auto", "cpu", "cuda")


def check_device(name: Any) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`, else a ConfigError."""
    if not isinstance(name, str) or not (
        name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())
    ):
        raise ConfigError(f"device: {name!r} is not valid; choose one of {list(DEVICES)} or 'cuda:N'")
    return name


def resolve_device(name: str) -> str:
    """`auto` and `cuda` -> a CUDA device leased for this process when CUDA is present (runs side by
    side each get a card of their own; `biasdd.training.lease`), else `auto` -> cpu; `cpu` and `cuda:N`
    as given. A second call returns the same device."""
    check_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but no CUDA device is available; use 'auto' or 'cpu'")
    if name in ("auto", "cuda"):
        return lease_device(name)
    return name


@dataclass(frozen=True)
class ModelConfig(Config):
    """The `model` section: the network (docs/protocol.md §5)."""

    SECTION: ClassVar[str] = "model"

    net: str
    width: PositiveInt

    def check(self, where: str) -> None:
        if self.net not in NETWORKS:
            raise ConfigError(f"{where}.net: {self.net!r} is not valid; choose one of {sorted(NETWORKS)}")


@dataclass(frozen=True)
class RunKeys(Config):
    """The top-level keys a training stage reads."""

    dataset: Dataset
    seed: NonNegativeInt
    budget: Budget
    device: str

    def check(self, where: str) -> None:
        check_device(self.device)


@dataclass(frozen=True)
class RunConfig:
    """What every training stage shares."""

    dataset: str
    seed: int
    budget: str
    device: str  # as asked (auto, cpu, cuda, cuda:N) until `start` resolves it (cpu, cuda:N)
    model: ModelConfig
    compute: ComputeConfig

    def provenance(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "dataset": self.dataset,
            "seed": self.seed,
            "model": dataclasses.asdict(self.model),
            "compute": dataclasses.asdict(self.compute),
        }


def run_config(params: Mapping[str, Any]) -> RunConfig:
    """Validate the keys every training stage reads. No side effect: the device stays as asked (`auto`,
    `cuda`, ...) until `start` resolves it, so validation never waits for a GPU."""
    keys = from_dict(RunKeys, {k: section(params, k) for k in ("dataset", "seed", "budget", "device")}, "")
    model = from_dict(ModelConfig, section(params, "model"), "model")
    compute = from_dict(ComputeConfig, section(params, "compute"), "compute")
    if keys.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device: {keys.device!r} asked for, but no CUDA device is available; use 'auto' or 'cpu'"
        )
    return RunConfig(keys.dataset, keys.seed, keys.budget, keys.device, model, compute)


def start(run: RunConfig) -> RunConfig:
    """`run` with its device resolved, at the start of a stage's work: `auto`/`cuda` take a GPU lease (held
    until the process ends; `biasdd.training.lease`). On the CPU it also fixes the allocator's thresholds
    for the process (`compute.tune_cpu_allocator`: no result changes) and warns where bf16 is asked for
    on a CPU without bf16 instructions (`compute.warn_if_bf16_emulated`)."""
    device = resolve_device(run.device)
    if torch.device(device).type == "cpu":
        tune_cpu_allocator()
        warn_if_bf16_emulated(run.compute)
    return dataclasses.replace(run, device=device)


def net_factory(
    run: RunConfig, channels: int, im_size: int, width: int | None = None
) -> Callable[[torch.Generator], nn.Module]:
    """generator -> a freshly initialised network of `run.model` (at `width` if given), on the device."""

    def make(generator: torch.Generator) -> nn.Module:
        net = build_network(
            run.model.net, channels, NUM_CLASSES, im_size, width or run.model.width, generator=generator
        )
        return net.to(run.device)

    return make


def derive_seed(seed: int, *names: str | int) -> int:
    """A sub-seed for (`seed`, names...), e.g. ("distill", "dm", 0); stable across runs and machines
    (docs/protocol.md §1: the first 8 bytes of SHA-256 of the JSON list, shifted right by one bit)."""
    digest = hashlib.sha256(json.dumps([seed, *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64
