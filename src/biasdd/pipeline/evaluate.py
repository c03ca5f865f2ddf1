"""The `evaluate@<method>` and `evaluate_full` stages: train fresh networks on a synthetic set or on the
full biased set, then score them per group on the unbiased test splits (docs/protocol.md §7).

`configure(params, name)` validates every param the stage reads, before any work; `run` trains
`evaluate.<synthetic|full>.repeats` networks (`biasdd.training.trainer`) and scores them; `metrics_files` lays
out the results: compact DVC metrics per test split and for the bias amplification
(`metrics/<split>/<name>.json`, `metrics/bias/<name>.json`), and everything else (per-repeat values,
aligned accuracy, sample counts, provenance) in a sidecar that is not a DVC metric
(`metrics/details/<name>.json`).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from biasdd import artifacts
from biasdd.config import Config, PositiveFloat, PositiveInt, check_value, from_dict, section
from biasdd.errors import ArtifactError, ConfigError, UnknownKeyError
from biasdd.pipeline.bias_classifier import amplification_metrics
from biasdd.training.augment import DCAugConfig, DSAConfig, dc_aug_config, dc_augment, dsa_augment, dsa_config
from biasdd.training.compute import FP32, ComputeConfig
from biasdd.training.data import NUM_CLASSES, TEST_SPLITS, load_split, train_stats
from biasdd.training.runtime import RunConfig, derive_seed, net_factory, run_config, start
from biasdd.training.trainer import Augment, NetworkEnsemble, TrainConfig, train_networks
from biasdd.vocab import LEARNED_LR

log = logging.getLogger(__name__)

METRICS = ("accuracy", "aligned_accuracy", "conflicting_accuracy", "worst_group_accuracy", "n")
AUGMENTS = ("none", "dsa", "dc")
FULL = "full"
LEARNED = "learned"  # a schedule's `lr: learned`: each set's own learned learning rate (MTT; §7)


@dataclass(frozen=True)
class EvaluateShared(Config):
    """How many networks an evaluation trains, and how it scores them."""

    SECTION: ClassVar[str] = "evaluate"

    repeats: PositiveInt  # networks (`evaluate.synthetic.repeats` / `evaluate.full.repeats`); on a
    # synthetic set, network r trains on distillation r (mod their number)
    batch_test: PositiveInt  # batch size for scoring the test splits (accelerators)


@dataclass(frozen=True)
class EvalSetup:
    name: str  # "full" or a method key
    run: RunConfig
    train: TrainConfig
    augment: Literal["none", "dsa", "dc"]
    shared: EvaluateShared
    limit_train: int | None
    dsa: DSAConfig | None
    dc_aug: DCAugConfig | None
    learned_lr: bool = False  # `lr: learned`: `train.lr` is replaced by each set's learned rate

    def provenance(self) -> dict[str, Any]:
        train = dataclasses.asdict(self.train)
        if self.learned_lr:
            train["lr"] = LEARNED
        return {
            "name": self.name,
            **self.run.provenance(),
            "train": train,
            "augment": self.augment,
            "repeats": self.shared.repeats,
            "limit_train": self.limit_train,
        }


def configure(params: Mapping[str, Any], name: str) -> EvalSetup:
    """Validate every param the evaluate stage for `name` (full, or a method key) uses."""
    run = run_config(params)
    kind = "full" if name == FULL else "synthetic"
    # each value validated under its own key (`evaluate.synthetic.repeats`, not `evaluate.repeats`)
    shared = EvaluateShared(
        repeats=check_value(
            f"evaluate.{kind}.repeats", section(params, "evaluate", kind, "repeats"), PositiveInt
        ),
        batch_test=check_value("evaluate.batch_test", section(params, "evaluate", "batch_test"), PositiveInt),
    )
    limit_train, learned_lr = None, False
    if name == FULL:
        values = dict(section(params, "evaluate", "full"))
        for key in ("limit_train", "repeats"):
            if key not in values:
                raise UnknownKeyError(f"evaluate.full: missing key(s) ['evaluate.full.{key}']")
        values.pop("repeats")
        # train on the first n images only (null = all)
        limit_train = check_value("evaluate.full.limit_train", values.pop("limit_train"), PositiveInt | None)
        train = from_dict(TrainConfig, values, "evaluate.full")
        augment = "none"
    else:
        where = f"evaluate.synthetic.schedule.{run.dataset}.{name}"
        schedules = section(params, "evaluate", "synthetic", "schedule", run.dataset)
        if name not in schedules:
            raise ConfigError(f"{where}: missing; the schedules there are for {sorted(schedules)}")
        shared_train = section(params, "evaluate", "synthetic", "train")
        hints = typing.get_type_hints(TrainConfig, include_extras=True)
        for key, value in shared_train.items():  # a shared value's error names its own key
            if key in hints and key not in schedules[name]:
                check_value(f"evaluate.synthetic.train.{key}", value, hints[key])
        values = {**shared_train, **schedules[name]}
        augment = values.pop("augment", None)
        if augment not in AUGMENTS:
            raise ConfigError(f"{where}.augment: {augment!r} is not valid; choose one of {list(AUGMENTS)}")
        if "lr" in schedules[name]:  # a schedule's own rate: a number, or the set's learned one
            lr = check_value(f"{where}.lr", schedules[name]["lr"], PositiveFloat | Literal["learned"])
            learned_lr = lr == LEARNED
            if learned_lr:  # validated as the shared rate; `run` trains at each set's learned one
                shared_lr = shared_train.get("lr")
                values["lr"] = check_value("evaluate.synthetic.train.lr", shared_lr, PositiveFloat)
        train = from_dict(TrainConfig, values, where)
    dsa = dsa_config(params, run.dataset) if augment == "dsa" else None
    dc_aug = dc_aug_config(params) if augment == "dc" else None
    return EvalSetup(name, run, train, augment, shared, limit_train, dsa, dc_aug, learned_lr)


def learned_rates(setup: EvalSetup, synthetic_path: Path, sets: int) -> list[float]:
    """Network r's learning rate under `lr: learned`: the one distillation r mod `sets` learnt
    (`vocab.LEARNED_LR`, an attribute of its `repeat_<r>` group), as the reference evaluates MTT."""
    where = f"evaluate.synthetic.schedule.{setup.run.dataset}.{setup.name}.lr"
    rates = []
    for index in range(sets):
        attrs = artifacts.read_attrs(synthetic_path, f"repeat_{index}", kind="synthetic")
        if LEARNED_LR not in attrs:
            raise ConfigError(
                f"{where}: 'learned', but {synthetic_path} holds no learned learning rate (only MTT learns "
                "one); give a number"
            )
        rate = float(attrs[LEARNED_LR])
        if not (np.isfinite(rate) and rate > 0):
            raise ArtifactError(
                f"{synthetic_path}: repeat_{index}'s learned learning rate is {rate}, not a positive number "
                f"(the distillation diverged); lower distill.{setup.name}.lr_lr and rebuild it with "
                f"`dvc repro distill@{setup.name}`"
            )
        rates.append(rate)
    return [rates[r % sets] for r in range(setup.shared.repeats)]


def train_at_rates(
    images: Tensor,
    labels: Tensor,
    factory: Callable[[torch.Generator], nn.Module],
    cfg: TrainConfig,
    generators: list[torch.Generator],
    rates: list[float] | None,
    **options: Any,
) -> NetworkEnsemble:
    """`train_networks`, with network r at `rates[r]` (None: all at `cfg.lr`). Networks that share a
    rate train together; each draws from its own generator, so grouping changes nothing but order."""
    if rates is None:
        return train_networks(images, labels, factory, cfg, generators, **options)
    parts = []
    for rate in dict.fromkeys(rates):  # distinct rates, in order
        members = [r for r, value in enumerate(rates) if value == rate]
        part = train_networks(
            images[members] if images.dim() == 5 else images,
            labels[members] if labels.dim() == 2 else labels,
            factory,
            dataclasses.replace(cfg, lr=rate),
            [generators[r] for r in members],
            **options,
        )
        parts.append((members, part))
    order = torch.tensor([r for members, _ in parts for r in members]).argsort()  # back to network order

    def joined(tensors: list[Tensor | None]) -> Tensor | None:
        if any(t is None for t in tensors):
            return None
        return torch.cat(tensors)[order.to(tensors[0].device)]  # type: ignore[index, union-attr]

    first = parts[0][1]
    return NetworkEnsemble(
        base=first.base,
        params={k: joined([p.params[k] for _, p in parts]) for k in first.params},  # type: ignore[misc]
        buffers={k: joined([p.buffers[k] for _, p in parts]) for k in first.buffers},  # type: ignore[misc]
        train_loss=joined([p.train_loss for _, p in parts]),
    )


def make_augment(setup: EvalSetup, channel_mean: Tensor) -> Augment | None:
    """The training augmentation: DSA per sample (not siamese), DC's digits augmentation, or none."""
    if setup.augment == "dsa":
        dsa = setup.dsa
        assert dsa is not None

        def augment(x: Tensor, generator: torch.Generator) -> Tensor:
            return dsa_augment(x, dsa, generator, groups=None)

        return augment
    if setup.augment == "dc":
        dc_cfg = setup.dc_aug
        assert dc_cfg is not None

        def augment_dc(x: Tensor, generator: torch.Generator) -> Tensor:
            return dc_augment(x, generator, channel_mean, dc_cfg)

        return augment_dc
    return None


def run(
    setup: EvalSetup,
    data_path: Path,
    synthetic_path: Path | None,
    progress: bool = True,
    bias_classifier_path: Path | None = None,
) -> dict[str, Any]:
    """Train the evaluation networks and score them on both test splits; the full results.

    Full set: every network trains on the biased training split. Synthetic: network r trains on
    distillation r (mod the number of distillations), so each repeat is a new distillation seed and a
    new evaluation network (docs/protocol.md §7).
    """
    setup = dataclasses.replace(setup, run=start(setup.run))  # the device: leased now, not when validated
    trained = train_evaluation_networks(setup, data_path, synthetic_path, progress)
    results = evaluate_ensemble(
        trained.ensemble,
        load_test_splits(data_path),
        NUM_CLASSES,
        batch_size=setup.shared.batch_test,
        compute=setup.run.compute,
    )
    data_attrs = artifacts.read_attrs(data_path, kind="biased")
    out: dict[str, Any] = {
        "name": setup.name,
        "budget": setup.run.budget,
        "dataset": setup.run.dataset,
        "bias_ratio": data_attrs.get("bias_ratio"),
        "severity": data_attrs.get("severity"),
        "n_repeats": setup.shared.repeats,
        "n_synthetic_sets": trained.sets,
        "n_train": trained.n_train,
        "device": setup.run.device,
        "provenance": setup.provenance(),
    }
    if trained.rates is not None:
        out["learned_lr"] = trained.rates  # per network
    for split in TEST_SPLITS:
        out[split] = results[split]["summary"]
    if bias_classifier_path is not None:
        out["bias_amplification"] = amplification_metrics(
            bias_classifier_path, synthetic_path, setup.run.device
        )
    return out


@dataclass(frozen=True)
class TrainedNetworks:
    ensemble: NetworkEnsemble
    sets: int  # distilled sets the networks trained on (1 for the full set)
    n_train: int  # training images per network
    rates: list[float] | None  # each network's learned learning rate (`lr: learned`), else None


def load_test_splits(data_path: Path) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Every test split of the biased set, normalised by its training split: {split: (images, labels,
    attributes)}."""
    mean, std = train_stats(data_path)
    splits = {}
    for split in TEST_SPLITS:
        test = load_split(data_path, split, mean, std)
        splits[split] = (test.images, test.labels, test.attributes)
    return splits


def train_evaluation_networks(
    setup: EvalSetup, data_path: Path, synthetic_path: Path | None, progress: bool = True
) -> TrainedNetworks:
    """The evaluation networks of `run`, trained (on `setup.run.device`, already leased by `start`)."""
    mean, std = train_stats(data_path)
    device = setup.run.device
    if synthetic_path is None:
        train = load_split(data_path, "train", mean, std, limit=setup.limit_train)
        images: Tensor = train.images.to(device)
        labels: Tensor = train.labels.to(device)
        sets = 1
    else:
        groups = [
            g for g in artifacts.list_groups(synthetic_path, kind="synthetic") if g.startswith("repeat_")
        ]
        sets = len(groups)
        if sets == 0:
            hint = artifacts._rebuild_hint(synthetic_path, "synthetic")
            raise ArtifactError(f"{synthetic_path}: no distilled set in it; {hint}")
        per_net = [
            artifacts.read_h5(synthetic_path, f"repeat_{r % sets}", ("images", "labels"), kind="synthetic")
            for r in range(setup.shared.repeats)
        ]
        images = torch.stack([torch.from_numpy(d["images"]) for d in per_net]).to(device)  # (R, N, C, H, W)
        labels = torch.stack([torch.from_numpy(d["labels"]) for d in per_net]).to(device)  # (R, N)
        if sets == 1 or all(np.array_equal(per_net[0]["images"], d["images"]) for d in per_net):
            images, labels = images[0], labels[0]  # one shared set: no per-network copies
    channels, im_size = images.shape[-3], images.shape[-1]
    generators = [
        torch.Generator().manual_seed(derive_seed(setup.run.seed, "evaluate", setup.name, r))
        for r in range(setup.shared.repeats)
    ]
    channel_mean = torch.zeros(channels)  # images are normalised: the data mean is 0 per channel
    rates = None
    if setup.learned_lr and synthetic_path is not None:
        rates = learned_rates(setup, synthetic_path, sets)
    ensemble = train_at_rates(
        images,
        labels,
        net_factory(setup.run, channels, im_size),
        setup.train,
        generators,
        rates,
        augment=make_augment(setup, channel_mean),
        progress=progress,
        compute=setup.run.compute,
    )
    return TrainedNetworks(ensemble, sets, int(labels.shape[-1]), rates)


# --- the metrics files ------------------------------------------------------------------------------

# DVC metrics, per test split: (key, summary metric) as the mean over repeats; the accuracy also as
# `acc_sd` (std over repeats). Few and short, so that `dvc metrics show` fits a terminal; every other
# number (stds, per-repeat values) is in `details/<name>.json`.
HEADLINE = (("acc", "accuracy"), ("conflicting", "conflicting_accuracy"), ("worst", "worst_group_accuracy"))
HEADLINE_SD = ("acc",)


def metrics_files(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{relative path under metrics/: content}: the compact DVC metrics and the sidecar.

    - `<split>/<name>.json` (split = test_conflicting, test_uniform): `acc` and its std over repeats
      `acc_sd` (ddof 0), `conflicting` (accuracy on the bias-conflicting samples; on test_conflicting
      every sample is one, so it equals `acc`) and `worst` (worst (class, attribute) group), the means.
    - `bias/<name>.json`: `share`, the mean share of synthetic images the bias-only classifier labels
      with their class's aligned attribute (for `full`: the real training set's share), and `delta`,
      that share minus the real set's (> 0: the distillation amplifies the bias).
    - `details/<name>.json`: everything (per-repeat values, aligned accuracy, counts, provenance).
    """
    name = results["name"]
    files: dict[str, dict[str, Any]] = {}
    for split in TEST_SPLITS:
        summary = results[split]
        headline: dict[str, Any] = {}
        for key, metric in HEADLINE:
            headline[key] = summary[metric]["mean"]
            if key in HEADLINE_SD:
                headline[f"{key}_sd"] = summary[metric]["std"]
        files[f"{split}/{name}.json"] = headline
    amplification = results.get("bias_amplification")
    if amplification is not None:
        if "aligned_share" in amplification:
            share = amplification["aligned_share"]["mean"]
            delta = amplification["amplification"]
        else:  # the full set: the real training set's share is the reference itself
            share, delta = amplification["real_aligned_share"], 0.0
        files[f"bias/{name}.json"] = {"share": share, "delta": delta}
    files[f"details/{name}.json"] = dict(results)
    return files


# --- scoring ----------------------------------------------------------------------------------------


def group_metrics(
    pred: Tensor, labels: Tensor, attributes: Tensor, num_classes: int
) -> dict[str, float | None]:
    """Top-1 accuracy overall, on bias-aligned (attribute == label) and bias-conflicting samples, and
    on the worst (class, attribute) group that has samples; docs/protocol.md §7.

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

    counts, hits = group_hits(correct, labels, attributes, num_classes)
    present = counts > 0
    group_acc = hits[present] / counts[present]
    return {
        "accuracy": float(correct.mean()) if num_samples else None,
        "aligned_accuracy": mean_or_none(aligned),
        "conflicting_accuracy": mean_or_none(~aligned),
        "worst_group_accuracy": float(group_acc.min()) if num_samples else None,
        "n": num_samples,
    }


def group_hits(
    correct: Tensor, labels: Tensor, attributes: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Of every (class, attribute) group, its samples and its correct predictions: two (K * K,) float64
    tensors indexed by class * K + attribute. `correct` is 1 where a prediction is right, else 0."""
    group = labels.long() * num_classes + attributes.long()  # (N,) group id of (class, attribute)
    counts = torch.bincount(group, minlength=num_classes**2).double()
    hits = torch.bincount(group, weights=correct.double(), minlength=num_classes**2)
    return counts, hits


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
    compute: ComputeConfig = FP32,
) -> dict[str, dict]:
    """Score every network on every split: {split: {"per_repeat": [metrics per net], "summary": ...}}.

    `splits[name] = (images, labels, attributes)`; images are moved to the ensemble's device in batches.
    """
    results: dict[str, dict] = {}
    for name, (images, labels, attributes) in splits.items():
        pred = ensemble.predict(images, batch_size=batch_size, compute=compute)  # (R, N)
        per_repeat = [group_metrics(p, labels, attributes, num_classes) for p in pred]
        results[name] = {"per_repeat": per_repeat, "summary": summarise(per_repeat)}
        log.info(
            "%s: accuracy %s",
            name,
            ", ".join("None" if m["accuracy"] is None else f"{m['accuracy']:.4f}" for m in per_repeat),
        )
    return results
