"""What the `distill` and `evaluate` stages do, between reading params and writing artifacts.

Each stage script parses its paths, calls one `*_setup(params, ...)` here (which validates every param it
will use, before any work) and one `run_*` function, and writes the result through `biasdd.io`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from biasdd import debias as debias_lib
from biasdd import io
from biasdd.augment import DCAugConfig, DSAConfig, dc_augment, dsa_augment
from biasdd.config import budget_of, derive_seed, from_dict, resolve_device, section
from biasdd.debias import BiasClassifierConfig, BiasModelConfig, DebiasConfig
from biasdd.distill import CONFIGS, METHODS, DistillResult
from biasdd.evaluate import TrainConfig, evaluate_ensemble, train_networks
from biasdd.nets import NETWORKS, build_network
from biasdd.sources import DATASETS

log = logging.getLogger(__name__)

NUM_CLASSES = 10
AUGMENTS = ("none", "dsa", "dc")
TEST_SPLITS = ("test_conflicting", "test_uniform")


@dataclass(frozen=True)
class ModelConfig:
    net: str
    width: int

    def __post_init__(self) -> None:
        if self.net not in NETWORKS:
            raise ValueError(f"model.net: {self.net!r} is not valid; choose one of {sorted(NETWORKS)}")
        if self.width < 1:
            raise ValueError(f"model.width: {self.width!r} is not valid; expected an integer >= 1")


@dataclass(frozen=True)
class RunConfig:
    """What every distill/evaluate run shares: dataset, seed, budget, device, network."""

    dataset: str
    seed: int
    budget: str
    device: str
    model: ModelConfig


def _run_config(params: Mapping[str, Any]) -> RunConfig:
    dataset = params.get("dataset")
    if dataset not in DATASETS:
        raise ValueError(f"dataset: {dataset!r} is not valid; choose one of {list(DATASETS)}")
    seed = params.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: {seed!r} is not valid; expected an integer >= 0")
    model = from_dict(ModelConfig, section(params, "model"), "model")
    return RunConfig(dataset, seed, budget_of(params), resolve_device(params.get("device", "auto")), model)


def dsa_config(params: Mapping[str, Any], dataset: str) -> DSAConfig:
    """DSA params for `dataset`: the strategy without `flip` for the datasets in `augment.no_flip`."""
    augment = section(params, "augment")
    values = dict(augment["dsa"])
    if dataset in augment.get("no_flip", []):
        values["strategy"] = "_".join(op for op in values["strategy"].split("_") if op != "flip")
    return from_dict(DSAConfig, values, "augment.dsa")


def _positive_int(where: str, value: Any, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{where}: {value!r} is not valid; expected an integer >= {low}")
    return value


def _check_method(params: Mapping[str, Any], method: str) -> None:
    methods = params.get("methods", [])
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not valid; choose one of {sorted(METHODS)}")
    if method not in methods:
        raise ValueError(f"method: {method!r} is not in params `methods` {methods}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: {unknown} not valid; choose from {sorted(METHODS)}")


# --- data -----------------------------------------------------------------------------------------


@dataclass
class BiasedSplit:
    images: Tensor  # (N, C, H, W) float32, normalised
    labels: Tensor  # (N,) int64
    attributes: Tensor  # (N,) int64


def normalise(images_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Tensor:
    """(N, C, H, W) uint8 -> float32 (x / 255 - mean) / std, per channel."""
    x = torch.from_numpy(images_uint8).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def load_split(
    path: Path, split: str, mean: np.ndarray, std: np.ndarray, limit: int | None = None
) -> BiasedSplit:
    data = io.read_h5(path, split, ("images", "labels", "attributes"))
    n = len(data["labels"]) if limit is None else min(limit, len(data["labels"]))
    return BiasedSplit(
        normalise(data["images"][:n], mean, std),
        torch.from_numpy(data["labels"][:n].astype(np.int64)),
        torch.from_numpy(data["attributes"][:n].astype(np.int64)),
    )


def train_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    stats = io.read_h5(path, "train", ("mean", "std"))
    return stats["mean"], stats["std"]


# --- distillation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillSetup:
    method: str
    run: RunConfig
    cfg: Any  # the method's config dataclass (CONFIGS[method])
    dsa: DSAConfig | None
    repeats: int
    checkpoint_every: int
    debias: DebiasConfig

    def provenance(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            "budget": self.run.budget,
            "dataset": self.run.dataset,
            "seed": self.run.seed,
            "repeats": self.repeats,
            "model": dataclasses.asdict(self.run.model),
            "config": dataclasses.asdict(self.cfg),
            "dsa": dataclasses.asdict(self.dsa) if self.dsa else None,
        }
        if self.debias.mode != "none":  # `none` keeps today's artifacts and checkpoints byte-identical
            out["debias"] = dataclasses.asdict(self.debias)
        return out


def distill_setup(params: Mapping[str, Any], method: str) -> DistillSetup:
    """Validate every param the distill@<method> stage uses."""
    _check_method(params, method)
    run = _run_config(params)
    cfg = from_dict(CONFIGS[method], section(params, "distill", method), f"distill.{method}")
    shared = section(params, "distill")
    repeats = _positive_int("distill.repeats", shared.get("repeats"))
    checkpoint_every = _positive_int("distill.checkpoint_every", shared.get("checkpoint_every"), low=0)
    dsa = dsa_config(params, run.dataset) if method in ("dsa", "dm") else None
    debias = from_dict(DebiasConfig, section(params, "debias"), "debias")
    return DistillSetup(method, run, cfg, dsa, repeats, checkpoint_every, debias)


def net_factory(run: RunConfig, channels: int, im_size: int) -> Callable[[torch.Generator], nn.Module]:
    def make(generator: torch.Generator) -> nn.Module:
        net = build_network(
            run.model.net, channels, NUM_CLASSES, im_size, run.model.width, generator=generator
        )
        return net.to(run.device)

    return make


def debias_targets_for(
    setup: DistillSetup, train: BiasedSplit, labels: Tensor, bias_model_path: Path | None
) -> debias_lib.DebiasTargets | None:
    """The methods' `debias=` argument: None for `none`; attribute labels for `groups`; the biased
    model's scores (the bias_model stage's `train/scores`) for `inferred`."""
    scores = None
    if setup.debias.mode == "inferred":
        if bias_model_path is None:
            raise ValueError("debias.mode 'inferred' needs --bias-model (the bias_model stage's output)")
        scores = torch.from_numpy(io.read_h5(bias_model_path, "train", ("scores",))["scores"])
        if scores.shape != labels.shape:
            raise ValueError(f"{bias_model_path}: {scores.shape[0]} scores for {labels.shape[0]} images")
    return debias_lib.debias_targets(
        setup.debias, labels, NUM_CLASSES, attributes=train.attributes.to(labels.device), scores=scores
    )


def run_distill(
    setup: DistillSetup,
    data_path: Path,
    checkpoint_dir: Path | None,
    progress: bool = True,
    bias_model_path: Path | None = None,
) -> tuple[list[DistillResult], np.ndarray, np.ndarray]:
    """Distil `setup.repeats` synthetic sets from the biased training split, resuming from checkpoints.

    A checkpoint is used only when it was made by the same config on the same data (fingerprint).
    """
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    images = train.images.to(setup.run.device)
    labels = train.labels.to(setup.run.device)
    channels, im_size = images.shape[1], images.shape[-1]
    targets = debias_targets_for(setup, train, labels, bias_model_path)
    identity = {**setup.provenance(), "data": io.md5_file(data_path)}
    if setup.debias.mode == "inferred" and bias_model_path is not None:
        identity["bias_model"] = io.md5_file(bias_model_path)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    results = []
    for repeat in range(setup.repeats):
        generator = torch.Generator().manual_seed(
            derive_seed(setup.run.seed, "distill", setup.method, repeat)
        )
        resume, on_checkpoint = None, None
        ck_path = None
        if checkpoint_dir is not None and setup.checkpoint_every > 0:
            ck_path = checkpoint_dir / f"{setup.method}_repeat{repeat}.pt"
            saved = io.load_checkpoint(ck_path)
            if saved is not None and saved.get("fingerprint") == fingerprint:
                resume = saved["state"]
                log.info("resuming %s repeat %d from iteration %d", setup.method, repeat, resume["iteration"])
            elif saved is not None:
                log.info("ignoring %s: made by other params or data", ck_path)

            def on_checkpoint(state: dict, _path: Path = ck_path) -> None:
                io.save_checkpoint(_path, {"fingerprint": fingerprint, "state": state})

        result = METHODS[setup.method](
            images,
            labels,
            NUM_CLASSES,
            setup.cfg,
            net_factory(setup.run, channels, im_size),
            generator,
            dsa=setup.dsa,
            resume=resume,
            on_checkpoint=on_checkpoint,
            checkpoint_every=setup.checkpoint_every,
            progress=progress,
            debias=targets,
        )
        results.append(result)
    return results, mean, std


def synthetic_groups(results: list[DistillResult], mean: np.ndarray, std: np.ndarray) -> dict:
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
    return groups


def loss_table(results: list[DistillResult]) -> str:
    """CSV for `dvc plots`: iteration, loss (per repeat)."""
    lines = ["iteration,repeat,loss"]
    for repeat, result in enumerate(results):
        lines += [f"{i},{repeat},{loss:.6g}" for i, loss in enumerate(result.losses)]
    return "\n".join(lines) + "\n"


# --- evaluation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSetup:
    name: str  # "full" or a method key
    run: RunConfig
    train: TrainConfig
    augment: Literal["none", "dsa", "dc"]
    repeats: int
    batch_test: int
    limit_train: int | None
    dsa: DSAConfig | None
    dc_aug: DCAugConfig | None

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "budget": self.run.budget,
            "dataset": self.run.dataset,
            "seed": self.run.seed,
            "model": dataclasses.asdict(self.run.model),
            "train": dataclasses.asdict(self.train),
            "augment": self.augment,
            "repeats": self.repeats,
            "limit_train": self.limit_train,
        }


def evaluate_setup(params: Mapping[str, Any], name: str) -> EvalSetup:
    """Validate every param the evaluate@<name> stage uses (`name` = full or a method)."""
    if name != "full":
        _check_method(params, name)
    run = _run_config(params)
    shared = section(params, "evaluate")
    repeats = _positive_int("evaluate.repeats", shared.get("repeats"))
    batch_test = _positive_int("evaluate.batch_test", shared.get("batch_test"))
    limit_train = None
    if name == "full":
        values = dict(section(params, "evaluate", "full"))
        limit_train = values.pop("limit_train", None)
        if limit_train is not None:
            _positive_int("evaluate.full.limit_train", limit_train, low=10)
        augment = "none"
        where = "evaluate.full"
    else:
        schedule = section(params, "evaluate", "synthetic", "schedule", run.dataset, name)
        values = {**section(params, "evaluate", "synthetic", "train"), **schedule}
        augment = values.pop("augment", None)
        if augment not in AUGMENTS:
            raise ValueError(
                f"evaluate.synthetic.schedule.{run.dataset}.{name}.augment: {augment!r} is not valid; "
                f"choose one of {list(AUGMENTS)}"
            )
        where = f"evaluate.synthetic.schedule.{run.dataset}.{name}"
    train = from_dict(TrainConfig, values, where)
    dsa = dsa_config(params, run.dataset) if augment == "dsa" else None
    dc_aug = (
        from_dict(DCAugConfig, section(params, "augment")["dc"], "augment.dc") if augment == "dc" else None
    )
    return EvalSetup(name, run, train, augment, repeats, batch_test, limit_train, dsa, dc_aug)


def make_augment(
    setup: EvalSetup, channel_mean: Tensor
) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """The training augmentation: DSA per sample (not siamese), DC's digits augmentation, or none."""
    if setup.augment == "dsa":
        dsa = setup.dsa

        def augment(x: Tensor, generator: torch.Generator) -> Tensor:
            return dsa_augment(x, dsa, generator, groups=None)

        return augment
    if setup.augment == "dc":
        dc_cfg = setup.dc_aug

        def augment_dc(x: Tensor, generator: torch.Generator) -> Tensor:
            return dc_augment(x, generator, channel_mean, dc_cfg)

        return augment_dc
    return None


def run_evaluate(
    setup: EvalSetup,
    data_path: Path,
    synthetic_path: Path | None,
    progress: bool = True,
    bias_classifier_path: Path | None = None,
) -> dict[str, Any]:
    """Train `setup.repeats` networks (batched) and score them on both test splits.

    Full set: every network trains on the biased training split. Synthetic: network r trains on
    distillation r (mod the number of distillations), so each repeat is a new distillation seed and a
    new evaluation network (PROTOCOL section 7).
    """
    mean, std = train_stats(data_path)
    device = setup.run.device
    if synthetic_path is None:
        train = load_split(data_path, "train", mean, std, limit=setup.limit_train)
        images: Tensor = train.images.to(device)
        labels: Tensor = train.labels.to(device)
        sets = 1
    else:
        groups = [g for g in io.list_groups(synthetic_path) if g.startswith("repeat_")]
        sets = len(groups)
        per_net = [
            io.read_h5(synthetic_path, f"repeat_{r % sets}", ("images", "labels"))
            for r in range(setup.repeats)
        ]
        images = torch.stack([torch.from_numpy(d["images"]) for d in per_net]).to(device)  # (R, N, C, H, W)
        labels = torch.stack([torch.from_numpy(d["labels"]) for d in per_net]).to(device)  # (R, N)
        if sets == 1 or all(np.array_equal(per_net[0]["images"], d["images"]) for d in per_net):
            images, labels = images[0], labels[0]  # one shared set: no per-network copies
    channels, im_size = images.shape[-3], images.shape[-1]
    generators = [
        torch.Generator().manual_seed(derive_seed(setup.run.seed, "evaluate", setup.name, r))
        for r in range(setup.repeats)
    ]
    channel_mean = torch.zeros(channels)  # images are normalised: the data mean is 0 per channel
    ensemble = train_networks(
        images,
        labels,
        net_factory(setup.run, channels, im_size),
        setup.train,
        generators,
        augment=make_augment(setup, channel_mean),
        progress=progress,
    )
    splits = {}
    for split in TEST_SPLITS:
        test = load_split(data_path, split, mean, std)
        splits[split] = (test.images, test.labels, test.attributes)
    results = evaluate_ensemble(ensemble, splits, NUM_CLASSES, batch_size=setup.batch_test)
    data_attrs = io.read_attrs(data_path)
    metrics: dict[str, Any] = {
        "name": setup.name,
        "budget": setup.run.budget,
        "dataset": setup.run.dataset,
        "bias_ratio": data_attrs.get("bias_ratio"),
        "severity": data_attrs.get("severity"),
        "n_repeats": setup.repeats,
        "n_synthetic_sets": sets,
        "n_train": int(labels.shape[-1]),
        "device": device,
    }
    for split in TEST_SPLITS:
        metrics[split] = results[split]["summary"]
    if bias_classifier_path is not None:
        metrics["bias_amplification"] = amplification_metrics(bias_classifier_path, synthetic_path, device)
    return metrics


# --- biased model and bias classifier (issue 6) -----------------------------------------------------


@dataclass(frozen=True)
class BiasModelSetup:
    run: RunConfig
    model: BiasModelConfig
    classifier: BiasClassifierConfig

    def provenance(self, kind: Literal["bias_model", "bias_classifier"]) -> dict[str, Any]:
        return {
            "budget": self.run.budget,
            "dataset": self.run.dataset,
            "seed": self.run.seed,
            "net": self.run.model.net,
            "config": dataclasses.asdict(self.model if kind == "bias_model" else self.classifier),
        }


def bias_model_setup(params: Mapping[str, Any]) -> BiasModelSetup:
    """Validate every param the bias_model and bias_classifier stages use."""
    run = _run_config(params)
    model = from_dict(BiasModelConfig, section(params, "bias_model"), "bias_model")
    classifier = from_dict(BiasClassifierConfig, section(params, "bias_classifier"), "bias_classifier")
    return BiasModelSetup(run, model, classifier)


def _factory_at(
    run: RunConfig, width: int, channels: int, im_size: int
) -> Callable[[torch.Generator], nn.Module]:
    return net_factory(dataclasses.replace(run, model=ModelConfig(run.model.net, width)), channels, im_size)


def run_bias_model(setup: BiasModelSetup, data_path: Path, progress: bool = True) -> dict:
    """The GCE-biased model's score of every training sample: {"train": {"scores": (N,) float32}}."""
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    images = train.images.to(setup.run.device)
    generator = torch.Generator().manual_seed(derive_seed(setup.run.seed, "bias_model"))
    factory = _factory_at(setup.run, setup.model.width, images.shape[1], images.shape[-1])
    scores = debias_lib.train_biased_model(images, train.labels, setup.model, factory, generator, progress)
    conflicting = train.attributes != train.labels  # only logged: the scores never see attributes
    if bool(conflicting.any()) and bool((~conflicting).any()):
        log.info(
            "biased model: mean score %.3f on bias-aligned, %.3f on bias-conflicting samples",
            float(scores[~conflicting].mean()),
            float(scores[conflicting].mean()),
        )
    return {"train": {"scores": scores.numpy().astype(np.float32)}}


def run_bias_classifier(
    setup: BiasModelSetup, data_path: Path, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint, metrics) of the bias-only attribute classifier; the checkpoint holds what
    `load_bias_classifier` needs plus the real training set's aligned share (the reference)."""
    cfg = setup.classifier
    mean, std = train_stats(data_path)
    train = load_split(data_path, "train", mean, std)
    device = setup.run.device
    images = train.images.to(device)
    channels, im_size = images.shape[1], images.shape[-1]
    generator = torch.Generator().manual_seed(derive_seed(setup.run.seed, "bias_classifier"))
    factory = _factory_at(setup.run, cfg.width, channels, im_size)
    classifier = debias_lib.train_bias_classifier(
        images, train.labels, train.attributes, NUM_CLASSES, cfg, factory, generator, progress
    )
    subset = debias_lib.strided_subset(len(train.labels), cfg.reference_limit)
    reference = debias_lib.bias_amplification(
        classifier, train.images[subset], train.labels[subset], NUM_CLASSES
    )
    test = load_split(data_path, "test_uniform", mean, std)
    accuracy = debias_lib.attribute_accuracy(classifier, test.images, test.attributes)
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        "net": setup.run.model.net,
        "width": cfg.width,
        "channels": channels,
        "im_size": im_size,
        "reference": reference,
        "provenance": setup.provenance("bias_classifier"),
    }
    metrics = {
        "attribute_accuracy_test_uniform": accuracy,
        "real_aligned_share": reference["mean"],
        "real_aligned_share_per_class": reference["per_class"],
        "n_reference": int(subset.numel()),
    }
    return checkpoint, metrics


def load_bias_classifier(path: Path, device: str) -> tuple[nn.Module, float | None]:
    """(classifier in eval mode on `device`, the real set's mean aligned share)."""
    saved = io.load_checkpoint(path)
    if saved is None:
        raise FileNotFoundError(f"{path}: no bias classifier (run the bias_classifier stage first)")
    net = build_network(saved["net"], saved["channels"], NUM_CLASSES, saved["im_size"], saved["width"])
    net.load_state_dict(saved["state_dict"])
    return net.to(device).eval(), saved["reference"]["mean"]


def amplification_metrics(classifier_path: Path, synthetic_path: Path | None, device: str) -> dict[str, Any]:
    """The bias-amplification diagnostic: for a synthetic set, the share of each class's synthetic images
    the bias-only classifier labels with the class's aligned attribute (per set, then mean/std over sets)
    against the real set's share; for the full set, the reference alone."""
    classifier, reference = load_bias_classifier(classifier_path, device)
    if synthetic_path is None:
        return {"real_aligned_share": reference}
    per_set = []
    for group in sorted(g for g in io.list_groups(synthetic_path) if g.startswith("repeat_")):
        data = io.read_h5(synthetic_path, group, ("images", "labels"))
        per_set.append(
            debias_lib.bias_amplification(
                classifier, torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]), NUM_CLASSES
            )
        )
    return debias_lib.summarise_amplification(per_set, reference)
