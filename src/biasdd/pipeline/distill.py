"""The `distill@<method>` stage: params -> checked configs, biased.h5 -> synthetic sets -> artifact.

`configure(params, method)` validates every param the stage reads, before any work; `run` distils
`distill.repeats` synthetic sets (or `distill.<method>.repeats` where that is set; each its own derived
seed), resuming from checkpoints; a method that needs expert trajectories (MTT) reads them from the
experts stage's artifact (`load_trajectories`);
`synthetic_groups` and `loss_table` lay out `data/synthetic/<method>.h5` and the loss curve CSV.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from biasdd import artifacts
from biasdd.config import Config, NonNegativeInt, PositiveInt, check_value, from_dict, section
from biasdd.distill import METHODS, DebiasTargets, DistillConfig, DistillResult, mtt
from biasdd.distill.debias import SCORED, DebiasConfig, debias_targets
from biasdd.errors import ArtifactError, ConfigError
from biasdd.training.augment import DSAConfig, dsa_config
from biasdd.training.data import NUM_CLASSES, BiasedSplit, load_split, train_stats
from biasdd.training.runtime import RunConfig, derive_seed, net_factory, run_config, start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillShared(Config):
    """The keys of the `distill` section that every method shares."""

    SECTION: ClassVar[str] = "distill"

    repeats: PositiveInt  # distillations of this method, each with its own derived seed: `distill.repeats`,
    # or `distill.<method>.repeats` where that is set (not null)
    checkpoint_every: NonNegativeInt  # outer iterations between checkpoints (0 = never)


@dataclass(frozen=True)
class DistillSetup:
    method: str
    run: RunConfig
    cfg: DistillConfig  # the method's config class (METHODS[method].config)
    dsa: DSAConfig | None
    shared: DistillShared
    debias: DebiasConfig

    def provenance(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            **self.run.provenance(),
            "repeats": self.shared.repeats,
            "config": dataclasses.asdict(self.cfg),
            "dsa": dataclasses.asdict(self.dsa) if self.dsa else None,
        }
        if self.debias.mode != "none":  # `none` keeps the plain methods' artifacts and checkpoints
            out["debias"] = dataclasses.asdict(self.debias)
        return out


def configure(params: Mapping[str, Any], method: str) -> DistillSetup:
    """Validate every param the distill@<method> stage uses."""
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not valid; choose one of {sorted(METHODS)}")
    run = run_config(params)
    values = section(params, "distill", method)
    cfg = from_dict(METHODS[method].config, values, f"distill.{method}", read_apart=("repeats",))
    # every method may override the shared count; absent or null: `distill.repeats`
    own_repeats = check_value(f"distill.{method}.repeats", values.get("repeats"), PositiveInt | None)
    shared = from_dict(
        DistillShared, {k: section(params, "distill", k) for k in ("repeats", "checkpoint_every")}, "distill"
    )
    if own_repeats is not None:
        shared = dataclasses.replace(shared, repeats=own_repeats)
    dsa = dsa_config(params, run.dataset) if METHODS[method].uses_dsa else None
    debias = from_dict(DebiasConfig, section(params, "debias"), "debias")
    if not METHODS[method].draws_real and debias.mode != "none":
        raise ConfigError(
            f"debias.mode: {debias.mode!r} is not valid with {method}, which matches no real batches "
            "(its targets are expert trajectories); choose 'none'"
        )
    return DistillSetup(method, run, cfg, dsa, shared, debias)


def load_trajectories(path: Path, setup: DistillSetup, channels: int, im_size: int) -> mtt.Trajectories:
    """The experts stage's trajectories, checked against the network distilled with and against
    `distill.<method>`'s start epochs (one-line errors, before any work)."""
    attrs = artifacts.read_attrs(path, kind="experts")
    hint = artifacts._rebuild_hint(path, "experts")
    if not attrs.get("needs_experts"):
        raise ArtifactError(f"{path}: holds no expert trajectories (made for another method); {hint}")
    data = artifacts.read_h5(path, "trajectories", ("params",), kind="experts")
    trajectories = mtt.Trajectories(
        torch.from_numpy(data["params"]),
        tuple(attrs["param_names"]),
        tuple(tuple(int(d) for d in shape) for shape in attrs["param_shapes"]),
    )
    net = net_factory(dataclasses.replace(setup.run, device="cpu"), channels, im_size)(torch.Generator())
    if mtt.layout(net) != (trajectories.names, trajectories.shapes):
        raise ArtifactError(f"{path}: recorded for another network than `model` gives; {hint}")
    assert isinstance(setup.cfg, mtt.MTTConfig)
    mtt.check_fits(trajectories, setup.cfg, f"distill.{setup.method}")
    return trajectories


def debias_targets_for(
    setup: DistillSetup, train: BiasedSplit, labels: Tensor, bias_model_path: Path | None
) -> DebiasTargets | None:
    """The methods' `debias=` argument: None for `none`; the attribute labels for `groups` and `fairdd`;
    the bias model's scores (`train/scores`) for `inferred` and its pseudo-attributes
    (`train/pseudo_attributes`) for all three inferred modes (the bias_model stage)."""
    mode, inferred = setup.debias.mode, {}
    if setup.debias.uses_bias_model:
        if bias_model_path is None:
            raise ConfigError(f"debias.mode {mode!r} needs --bias-model (the bias_model stage's output)")
        # `inferred` reads the pseudo-attributes too: where they hold no bias group, it runs the plain method
        keys = ("scores", "pseudo_attributes") if mode in SCORED else ("pseudo_attributes",)
        read = artifacts.read_h5(bias_model_path, "train", keys, kind="bias_model")
        for key in keys:
            inferred[key] = torch.from_numpy(read[key])
            if inferred[key].shape != labels.shape:
                raise ArtifactError(
                    f"{bias_model_path}: {inferred[key].shape[0]} {key} for {labels.shape[0]} training "
                    "images (made from another biased.h5?); rebuild it with `dvc repro bias_model`"
                )
    return debias_targets(
        setup.debias, labels, NUM_CLASSES, attributes=train.attributes.to(labels.device), **inferred
    )


def checkpoint_path(checkpoint_dir: Path, method: str, repeat: int) -> Path:
    return checkpoint_dir / f"{method}_repeat{repeat}.pt"


def run(
    setup: DistillSetup,
    data_path: Path,
    checkpoint_dir: Path | None,
    progress: bool = True,
    bias_model_path: Path | None = None,
    experts_path: Path | None = None,
) -> tuple[list[DistillResult], np.ndarray, np.ndarray]:
    """Distil `distill.repeats` synthetic sets from the biased training split, resuming from checkpoints.

    A checkpoint is used only when it was made by the same config on the same data (fingerprint).
    `experts_path`: the experts stage's trajectories, for a method that needs them (MTT).
    """
    method = METHODS[setup.method]
    if method.needs_experts and experts_path is None:
        raise ConfigError(f"method {setup.method!r} needs --experts (the experts stage's output)")
    setup = dataclasses.replace(setup, run=start(setup.run))  # the device: leased now, not when validated
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    device = setup.run.device
    images, labels = train.images.to(device), train.labels.to(device)
    channels, im_size = images.shape[1], images.shape[-1]
    upstream = None
    if method.needs_experts and experts_path is not None:  # checked before any long computation
        upstream = load_trajectories(experts_path, setup, channels, im_size)
    targets = debias_targets_for(setup, train, labels, bias_model_path)
    identity = {**setup.provenance(), "data": artifacts.md5_file(data_path)}
    if setup.debias.uses_bias_model and bias_model_path is not None:
        identity["bias_model"] = artifacts.md5_file(bias_model_path)
    if upstream is not None and experts_path is not None:
        identity["experts"] = artifacts.md5_file(experts_path)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    results = []
    for repeat in range(setup.shared.repeats):
        generator = torch.Generator().manual_seed(
            derive_seed(setup.run.seed, "distill", setup.method, repeat)
        )
        resume, on_checkpoint = None, None
        if checkpoint_dir is not None and setup.shared.checkpoint_every > 0:
            path = checkpoint_path(checkpoint_dir, setup.method, repeat)
            saved = artifacts.load_checkpoint(path)
            if saved is not None and saved.get("fingerprint") == fingerprint:
                resume = saved["state"]
                log.info("resuming %s repeat %d from iteration %d", setup.method, repeat, resume["iteration"])
            elif saved is not None:
                log.info("ignoring %s: made by other params or data", path)

            def on_checkpoint(state: dict, _path: Path = path) -> None:
                artifacts.save_checkpoint(_path, {"fingerprint": fingerprint, "state": state})

        result = method(
            images,
            labels,
            NUM_CLASSES,
            setup.cfg,
            net_factory(setup.run, channels, im_size),
            generator,
            dsa=setup.dsa,
            compute=setup.run.compute,
            resume=resume,
            on_checkpoint=on_checkpoint,
            checkpoint_every=setup.shared.checkpoint_every,
            progress=progress,
            debias=targets,
            **({} if upstream is None else {"upstream": upstream}),
        )
        results.append(result)
    return results, mean, std


def synthetic_groups(results: list[DistillResult], mean: np.ndarray, std: np.ndarray) -> dict:
    """The groups of `data/synthetic/<method>.h5`: `normalisation` and one `repeat_<r>` per distillation."""
    groups: dict[str, dict[str, np.ndarray]] = {
        "normalisation": {
            "mean": np.asarray(mean, dtype=np.float64),
            "std": np.asarray(std, dtype=np.float64),
        }
    }
    for repeat, result in enumerate(results):
        groups[f"repeat_{repeat}"] = {
            "images": result.images.detach().cpu().numpy().astype(np.float32),
            "labels": result.labels.cpu().numpy().astype(np.int64),
            "loss": np.asarray(result.losses, dtype=np.float64),
        }
        if result.extras:  # what the method learnt besides the images (MTT: `learned_lr`), as attributes
            groups[f"repeat_{repeat}"]["@attrs"] = {k: float(v) for k, v in result.extras.items()}
    return groups


def loss_table(results: list[DistillResult]) -> str:
    """CSV for `dvc plots`: iteration, repeat, loss."""
    lines = ["iteration,repeat,loss"]
    for repeat, result in enumerate(results):
        lines += [f"{i},{repeat},{loss:.6g}" for i, loss in enumerate(result.losses)]
    return "\n".join(lines) + "\n"
