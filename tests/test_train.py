"""Tests for biasdd.training.trainer: stacked (vmapped) training == one-by-one == a plain sequential loop,
the LR schedule, the config, and compiled == eager."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasdd.config import from_dict
from biasdd.training.compute import ComputeConfig
from biasdd.training.nets import build_network
from biasdd.training.trainer import TrainConfig, lr_at, train_networks

NUM_CLASSES = 3
IM_SIZE = 8


def make_cfg(**overrides) -> TrainConfig:
    values = dict(
        epochs=4,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=4,
        lr_milestones=(2,),
        lr_gamma=0.1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def tiny_factory(dtype: torch.dtype = torch.float64):
    def factory(generator: torch.Generator) -> nn.Module:
        return build_network("convnet3", 3, NUM_CLASSES, IM_SIZE, width=4, generator=generator).to(dtype)

    return factory


def tiny_data(num_samples: int = 10, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(123)
    images = torch.randn(num_samples, 3, IM_SIZE, IM_SIZE, generator=g, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g)
    return images, labels


def noisy_flip(batch: Tensor, generator: torch.Generator) -> Tensor:
    """A generator-driven augmentation: per-sample horizontal flip and Gaussian noise."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    noise = 0.3 * torch.randn(batch.shape, generator=generator, dtype=batch.dtype)
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch) + noise


def train_sequential(
    images: Tensor,
    labels: Tensor,
    factory,
    cfg: TrainConfig,
    seed: int,
    augment=None,
    reset_momentum: bool = True,
) -> nn.Module:
    """The plain reference: one module, torch.optim.SGD, a new optimiser at each milestone, the same
    draws (init, then per epoch a permutation, then per batch an augmentation) from one generator."""
    generator = torch.Generator().manual_seed(seed)
    net = factory(generator)
    net.train()

    def new_sgd(lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    lr = cfg.lr
    optimizer = new_sgd(lr)
    for epoch in range(cfg.epochs):
        if epoch in cfg.lr_milestones:
            lr *= cfg.lr_gamma
            if reset_momentum:
                optimizer = new_sgd(lr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        perm = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], cfg.batch_size):
            index = perm[start : start + cfg.batch_size]
            batch = images[index]
            if augment is not None:
                batch = augment(batch, generator)
            loss = F.cross_entropy(net(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-10) -> None:
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=f"parameter {name} differs")


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        (pa - pb).abs().max().item()
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# --- batched == sequential ---------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False], ids=["vmapped", "one-by-one"])
@pytest.mark.parametrize("augment", [None, noisy_flip], ids=["plain", "augmented"])
def test_batched_equals_sequential(augment, batched) -> None:
    # N = 10 with batch 4: batches 4, 4, 2 (last partial batch kept); a milestone mid-run.
    images, labels = tiny_data(10)
    cfg = make_cfg(epochs=4, lr_milestones=(2,))
    seeds = [0, 1, 2]
    ensemble = train_networks(
        images,
        labels,
        tiny_factory(),
        cfg,
        [torch.Generator().manual_seed(s) for s in seeds],
        augment=augment,
        progress=False,
        batched=batched,
    )
    trained = ensemble.unstack()
    assert len(trained) == 3
    for seed, net in zip(seeds, trained, strict=True):
        reference = train_sequential(images, labels, tiny_factory(), cfg, seed, augment=augment)
        assert_same_weights(net, reference)
    # Training moved the weights away from the init.
    init = tiny_factory()(torch.Generator().manual_seed(0))
    assert max_weight_diff(trained[0], init) > 1e-3


@pytest.mark.parametrize("batched", [True, False], ids=["vmapped", "one-by-one"])
def test_per_network_training_sets(batched) -> None:
    # Each repeat trains on its own (distilled) set: network r must equal a sequential run on set r.
    sets = [tiny_data(10)[0] * (1 + r) for r in range(2)]
    labels = [tiny_data(10)[1].roll(r) for r in range(2)]
    cfg = make_cfg(epochs=3, lr_milestones=(1,))
    ensemble = train_networks(
        torch.stack(sets),
        torch.stack(labels),
        tiny_factory(),
        cfg,
        [torch.Generator().manual_seed(s) for s in (3, 4)],
        augment=noisy_flip,
        progress=False,
        batched=batched,
    )
    for r, (seed, net) in enumerate(zip((3, 4), ensemble.unstack(), strict=True)):
        reference = train_sequential(sets[r], labels[r], tiny_factory(), cfg, seed, augment=noisy_flip)
        assert_same_weights(net, reference)
    with pytest.raises(ValueError, match="leading dimension R = 3"):
        train_networks(
            torch.stack(sets),
            torch.stack(labels),
            tiny_factory(),
            cfg,
            [torch.Generator() for _ in range(3)],
            progress=False,
        )


def test_float32_batched_close_to_sequential() -> None:
    images, labels = tiny_data(10, torch.float32)
    cfg = make_cfg(epochs=3, lr_milestones=(1,))
    ensemble = train_networks(
        images,
        labels,
        tiny_factory(torch.float32),
        cfg,
        [torch.Generator().manual_seed(s) for s in (5, 6)],
        progress=False,
        batched=True,
    )
    for seed, net in zip((5, 6), ensemble.unstack(), strict=True):
        reference = train_sequential(images, labels, tiny_factory(torch.float32), cfg, seed)
        assert_same_weights(net, reference, atol=1e-5)


def test_each_network_gets_its_own_augmentation() -> None:
    images, labels = tiny_data(6)
    draws: list[tuple[int, Tensor]] = []

    def recording(batch: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype)
        draws.append((id(generator), noise))
        return batch + 0.1 * noise

    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    train_networks(
        images,
        labels,
        tiny_factory(),
        make_cfg(epochs=2, batch_size=6, lr_milestones=()),
        generators,
        recording,
        batched=True,
    )
    # 2 epochs x 1 batch x 3 networks, each call with its own network's generator.
    assert [gen_id for gen_id, _ in draws] == [id(g) for g in generators] * 2
    first_step = [noise for _, noise in draws[:3]]
    assert not torch.equal(first_step[0], first_step[1])
    assert not torch.equal(first_step[1], first_step[2])


# --- learning-rate schedule --------------------------------------------------------------------------


def test_lr_at_single_milestone() -> None:
    cfg = make_cfg(epochs=10, lr=0.01, lr_milestones=(5,))
    assert [lr_at(e, cfg) for e in range(5)] == [0.01] * 5
    assert all(math.isclose(lr_at(e, cfg), 0.001) for e in range(5, 10))


def test_lr_at_full_set_schedule() -> None:
    cfg = make_cfg(epochs=150, lr=0.01, lr_milestones=(50, 100))
    assert lr_at(0, cfg) == lr_at(49, cfg) == 0.01
    assert math.isclose(lr_at(50, cfg), 0.001) and math.isclose(lr_at(99, cfg), 0.001)
    assert math.isclose(lr_at(100, cfg), 1e-4) and math.isclose(lr_at(149, cfg), 1e-4)


def test_momentum_is_reset_at_milestone() -> None:
    # One batch per epoch, milestone at epoch 2: the batched result matches the reference that
    # re-creates SGD, and not one that keeps the momentum buffer, so the reset is observable.
    images, labels = tiny_data(4)
    cfg = make_cfg(epochs=3, batch_size=4, lr=0.1, lr_milestones=(2,), lr_gamma=0.5)
    ensemble = train_networks(
        images, labels, tiny_factory(), cfg, [torch.Generator().manual_seed(7)], progress=False
    )
    (net,) = ensemble.unstack()
    with_reset = train_sequential(images, labels, tiny_factory(), cfg, 7, reset_momentum=True)
    without_reset = train_sequential(images, labels, tiny_factory(), cfg, 7, reset_momentum=False)
    assert_same_weights(net, with_reset)
    assert max_weight_diff(net, without_reset) > 1e-6


# --- config validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", -0.01),
        ("lr", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("lr_gamma", 0.0),
        ("lr_milestones", (3, 2)),
        ("lr_milestones", (2, 2)),
        ("lr_milestones", (0,)),
        ("lr_milestones", (4,)),  # == epochs: would never fire
    ],
)
def test_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        make_cfg(**{field: value})


def test_config_from_params_dict() -> None:
    values = dict(
        epochs=150,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=256,
        lr_milestones=[50, 100],
        lr_gamma=0.1,
    )
    cfg = from_dict(TrainConfig, values, "evaluate.full")
    assert cfg.lr_milestones == (50, 100)
    with pytest.raises(KeyError, match="lr_schedule"):
        from_dict(TrainConfig, {**values, "lr_schedule": 3}, "evaluate.full")
    with pytest.raises(ValueError, match="lr_milestones"):
        from_dict(TrainConfig, {**values, "lr_milestones": [100, 50]}, "evaluate.full")
    with pytest.raises(ValueError, match="epochs"):
        dataclasses.replace(cfg, epochs=0)


@pytest.mark.slow
def test_compiled_training_matches_eager() -> None:
    # One full batch per epoch: the shape is hot after Compiled.COMPILE_AFTER epochs, then compiled.
    images, labels = tiny_data(8, torch.float32)
    cfg = make_cfg(epochs=8, batch_size=8, lr_milestones=(4,))
    ensembles = [
        train_networks(
            images,
            labels,
            tiny_factory(torch.float32),
            cfg,
            [torch.Generator().manual_seed(s) for s in (0, 1)],
            progress=False,
            compute=ComputeConfig(compile=compiled),
            batched=False,
        )
        for compiled in (False, True)
    ]
    for eager, compiled in zip(*(e.unstack() for e in ensembles), strict=True):
        assert_same_weights(eager, compiled, atol=1e-5)
