"""DC, DSA, DM, MTT on a tiny planted dataset: loss falls, determinism, resume, batched maths vs loops, and
MTT's loss and gradients against a transcription of the reference's step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from biasdd import vocab
from biasdd.config import from_dict
from biasdd.distill import METHODS, DistillResult, dc, dm, driver, mtt, sampling
from biasdd.errors import ConfigError
from biasdd.training.augment import DSAConfig, dsa_augment
from biasdd.training.compute import FP32, NetworkRunner
from biasdd.training.nets import build_network

from .tiny import tiny_params

NUM_CLASSES, CHANNELS, SIZE, PER_CLASS, WIDTH = 3, 3, 16, 12, 8
SHAPE = (CHANNELS, SIZE, SIZE)

# Tiny settings per method; loss-fall runs override iterations and lr_img.
TINY = {
    "dc": dict(
        ipc=2,
        iterations=3,
        outer_loop=2,
        inner_loop=1,
        lr_img=0.1,
        momentum_img=0.5,
        lr_net=0.01,
        batch_real=8,
        batch_train=4,
        init="noise",
        lr_img_synchronized=None,
    ),
    "dsa": dict(
        ipc=2,
        iterations=3,
        outer_loop=2,
        inner_loop=1,
        lr_img=0.1,
        momentum_img=0.5,
        lr_net=0.01,
        batch_real=8,
        batch_train=4,
        init="real",
        lr_img_synchronized=None,
    ),
    "dm": dict(
        ipc=2, iterations=3, lr_img=1.0, momentum_img=0.5, batch_real=8, init="real", lr_img_synchronized=None
    ),
    "mtt": dict(
        ipc=2,
        iterations=3,
        lr_img=100.0,
        momentum_img=0.5,
        batch_real=8,  # unused by MTT
        init="real",
        lr_img_synchronized=None,  # optional, unused by MTT
        syn_steps=3,
        expert_epochs=1,
        max_start_epoch=2,
        lr_lr=1e-5,
        lr_teacher=0.01,
        batch_syn=None,
    ),
}
# (iterations, lr_img, window) where the loss falls clearly from noise init with seed 0.
LOSS_FALL = {"dc": (20, 3.0, 5), "dsa": (20, 3.0, 5), "dm": (60, 10.0, 10), "mtt": (30, 100.0, 5)}
EXPERTS, EXPERT_EPOCHS = 2, 4  # tiny expert trajectories for MTT, trained on the planted set


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes, each a distinct colour plus noise (a planted, learnable signal)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    colours = torch.randn(NUM_CLASSES, CHANNELS, 1, 1, generator=generator) * 1.5
    images = colours[labels] + 0.5 * torch.randn(len(labels), CHANNELS, SIZE, SIZE, generator=generator)
    order = torch.randperm(len(labels), generator=generator)  # real sets are not sorted by class
    return images[order], labels[order]


def train_trajectories(images: torch.Tensor, labels: torch.Tensor, dtype=torch.float32) -> mtt.Trajectories:
    """EXPERTS plain-SGD experts (lr 0.01, batches of 12), flat parameters before and after each epoch."""
    trajectories = []
    for expert in range(EXPERTS):
        generator = torch.Generator().manual_seed(100 + expert)
        net = net_factory(generator).to(dtype)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        snapshots = [torch.cat([p.detach().reshape(-1) for p in net.parameters()])]
        for _ in range(EXPERT_EPOCHS):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), 12):
                index = order[start : start + 12]
                loss = F.cross_entropy(net(images[index].to(dtype)), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            snapshots.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
        trajectories.append(torch.stack(snapshots))
    return mtt.Trajectories(torch.stack(trajectories), *mtt.layout(net))


_TRAJECTORIES: dict[int, mtt.Trajectories] = {}  # per planted set (the module's fixture): trained once


def trajectories_for(planted) -> mtt.Trajectories:
    if id(planted) not in _TRAJECTORIES:
        _TRAJECTORIES[id(planted)] = train_trajectories(*planted)
    return _TRAJECTORIES[id(planted)]


DSA = DSAConfig(
    strategy="color_crop_cutout_flip_scale_rotate",
    ratio_crop_pad=0.125,
    ratio_cutout=0.5,
    ratio_scale=1.2,
    ratio_rotate=15.0,
    brightness=1.0,
    saturation=2.0,
    contrast=0.5,
)


def net_factory(generator: torch.Generator) -> torch.nn.Module:
    return build_network("convnet3", CHANNELS, NUM_CLASSES, SIZE, width=WIDTH, generator=generator)


def run(method: str, planted, seed: int = 0, **overrides) -> DistillResult:
    images, labels = planted
    extra = {
        k: overrides.pop(k)
        for k in ("resume", "on_checkpoint", "checkpoint_every", "debias", "compute")
        if k in overrides
    }
    if METHODS[method].needs_experts:
        extra["upstream"] = trajectories_for(planted)
    cfg = METHODS[method].config(**{**TINY[method], **overrides})
    generator = torch.Generator().manual_seed(seed)
    return METHODS[method](
        images, labels, NUM_CLASSES, cfg, net_factory, generator, dsa=DSA, progress=False, **extra
    )


def test_registry_and_configs_agree():
    assert tuple(METHODS) == vocab.METHODS == ("dc", "dsa", "dm", "mtt")  # vocab's titles name the rows
    assert set(vocab.STUDY_METHODS) < set(METHODS)
    assert tuple(k for k, m in METHODS.items() if m.needs_experts) == vocab.EXPERT_METHODS == ("mtt",)
    for key, method in METHODS.items():
        assert method.name == key and dataclasses.is_dataclass(method.config)
        assert {f.name for f in dataclasses.fields(method.config)} == set(TINY[key])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_falls(method, planted):
    iterations, lr_img, window = LOSS_FALL[method]
    losses = run(method, planted, iterations=iterations, lr_img=lr_img, init="noise").losses
    assert len(losses) == iterations
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < 0.95 * first, (first, last)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_labels_determinism(method, planted):
    result = run(method, planted)
    ipc = TINY[method]["ipc"]
    assert result.images.shape == (NUM_CLASSES * ipc, CHANNELS, SIZE, SIZE)
    assert result.images.dtype == torch.float32 and result.images.device.type == "cpu"
    assert torch.equal(result.labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert len(result.losses) == TINY[method]["iterations"]
    assert all(isinstance(v, float) for v in result.losses)
    again = run(method, planted)
    assert torch.equal(result.images, again.images) and result.losses == again.losses
    other = run(method, planted, seed=1)
    assert not torch.equal(result.images, other.images)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_identical(method, planted):
    full_states: list[dict] = []
    full = run(method, planted, iterations=5, on_checkpoint=full_states.append, checkpoint_every=1)
    assert [s["iteration"] for s in full_states] == [1, 2, 3, 4, 5]

    states: list[dict] = []

    def interrupt_after_second(state: dict) -> None:
        states.append(state)
        if len(states) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(method, planted, iterations=5, on_checkpoint=interrupt_after_second, checkpoint_every=1)
    assert states[-1]["iteration"] == 2 and len(states[-1]["losses"]) == 2
    assert torch.equal(states[-1]["images"], full_states[1]["images"])
    # Resume with a differently seeded generator: the checkpoint's generator state must take over.
    resumed = run(method, planted, seed=99, iterations=5, resume=states[-1])
    assert torch.equal(resumed.images, full.images)
    assert resumed.losses == full.losses
    assert full.extras.keys() == resumed.extras.keys() == ({vocab.LEARNED_LR} if method == "mtt" else set())
    assert all(torch.equal(resumed.extras[k], full.extras[k]) for k in full.extras)


def test_checkpoint_every_two(planted):
    states: list[dict] = []
    run("dm", planted, iterations=5, on_checkpoint=states.append, checkpoint_every=2)
    assert [s["iteration"] for s in states] == [2, 4]
    assert set(states[0]) == {"iteration", "images", "optimizer", "generator", "losses"}


def test_dsa_method_needs_dsa_config(planted):
    images, labels = planted
    cfg = METHODS["dsa"].config(**TINY["dsa"])
    with pytest.raises(ValueError, match="DSAConfig"):
        METHODS["dsa"](images, labels, NUM_CLASSES, cfg, net_factory, torch.Generator(), progress=False)


# --- batched maths against plain per-class loops (float64) -------------------------------------------


def loop_gradient_distance(net, real, syn) -> torch.Tensor:
    """The reference: per class, autograd.grad on real (detached) and syn (create_graph), distance_wb."""
    params = list(net.parameters())
    total = torch.zeros((), dtype=torch.float64)
    for c in range(real.shape[0]):
        target = torch.full((real.shape[1],), c)
        g_real = torch.autograd.grad(F.cross_entropy(net(real[c]), target), params)
        g_real = [g.detach() for g in g_real]
        target = torch.full((syn.shape[1],), c)
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn[c]), target), params, create_graph=True)
        for gr, gs in zip(g_real, g_syn, strict=True):
            if gr.ndim == 1:
                continue  # biases and norm parameters are ignored
            gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
            total = total + torch.sum(1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6))
    return total


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_float64(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    net = net_factory(generator).double()
    real = torch.randn(NUM_CLASSES, 6, CHANNELS, SIZE, SIZE, generator=generator, dtype=torch.float64)
    syn = torch.randn(NUM_CLASSES, 2, CHANNELS, SIZE, SIZE, generator=generator, dtype=torch.float64)
    return net, real, syn


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "fallback-loop"])
def test_matching_loss_and_image_gradient_equal_loop(batched):
    net, real, syn = tiny_float64()
    syn_a = syn.clone().requires_grad_(True)
    class_gradients = dc.ClassGradients(batched)
    loss = dc.matching_loss(net, real, syn_a, class_gradients)
    loss.backward()
    assert class_gradients.batched == batched  # the batched path did not fall back
    assert all(p.grad is None for p in net.parameters())  # matching leaves the net's grads alone
    syn_b = syn.clone().requires_grad_(True)
    expected = loop_gradient_distance(net, real, syn_b)
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) / abs(float(expected.detach())) < 1e-6
    assert relative_error(syn_a.grad, syn_b.grad) < 1e-6


def test_dm_loss_and_image_gradient_equal_loop():
    net, real, syn = tiny_float64(1)
    net.requires_grad_(False)
    syn_a = syn.clone().requires_grad_(True)
    loss = dm.embedding_loss(net, real, syn_a)
    loss.backward()
    syn_b = syn.clone().requires_grad_(True)
    expected = torch.zeros((), dtype=torch.float64)
    for c in range(NUM_CLASSES):
        real_mean = net.embed(real[c]).detach().mean(0)
        expected = expected + ((real_mean - net.embed(syn_b[c]).mean(0)) ** 2).sum()
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) / float(expected.detach()) < 1e-6
    assert relative_error(syn_a.grad, syn_b.grad) < 1e-6


# --- MTT against a transcription of the reference's step (float64) ---------------------------------------


def reference_mtt_loss(net, syn, labels, syn_lr, trajectory, start_epoch, cfg, generator, dsa=None):
    """One iteration of the reference's distill.py, transcribed: flat student parameters read through
    split + view (its ReparamModule), `autograd.grad(create_graph=True)`, minibatches popped from the end
    of a split random permutation, mse sums divided by the parameter count."""
    starting, target = trajectory[start_epoch], trajectory[start_epoch + cfg.expert_epochs]
    names, shapes = mtt.layout(net)
    numels = [math.prod(shape) for shape in shapes]
    student_params = [starting.clone().requires_grad_(True)]
    batch_syn = cfg.batch_syn or len(syn)
    indices_chunks: list[torch.Tensor] = []
    for _ in range(cfg.syn_steps):
        if not indices_chunks:
            indices = torch.randperm(len(syn), generator=generator)
            indices_chunks = list(torch.split(indices, batch_syn))
        these_indices = indices_chunks.pop()
        x = syn[these_indices]
        if dsa is not None:  # the same per-sample augmentation, drawn in the same order
            x = dsa_augment(x, dsa, generator)
        flat = student_params[-1]
        views = {n: p.view(shape) for n, p, shape in zip(names, flat.split(numels), shapes, strict=True)}
        out = torch.func.functional_call(net, views, (x,))
        ce_loss = F.cross_entropy(out, labels[these_indices])
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = sum(numels)
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
    param_dist = F.mse_loss(starting, target, reduction="sum") / num_params
    return param_loss / param_dist


@pytest.mark.parametrize("dsa", [None, DSA], ids=["no-augmentation", "same-augmentation"])
def test_mtt_loss_and_gradients_equal_the_reference_step(planted, dsa):
    images, labels = planted
    net = net_factory(torch.Generator().manual_seed(3)).double()
    trajectories = train_trajectories(images, labels, torch.float64)
    ipc = 3
    syn = images[torch.cat([torch.nonzero(labels == c).squeeze(1)[:ipc] for c in range(NUM_CLASSES)])]
    syn = syn.double()
    syn_labels = driver.class_labels(NUM_CLASSES, ipc, "cpu")
    # 9 images in minibatches of 4: chunks 4, 4, 1, the last one drawn first, then a new permutation
    cfg = mtt.MTTConfig(**{**TINY["mtt"], "ipc": ipc, "syn_steps": 5, "batch_syn": 4, "max_start_epoch": 3})
    generator = torch.Generator().manual_seed(7)
    context = driver.Context(
        NUM_CLASSES, ipc, syn_labels, None, dsa, generator, torch.device("cpu"), trajectories
    )
    matcher = mtt.TrajectoryMatching(cfg, context)
    matcher.syn_lr.data.fill_(0.02)  # not the initial value: the step size is an input like the images
    saved = generator.get_state()
    matcher.start(NetworkRunner(net, FP32, "cpu"))
    syn_ours = syn.clone().requires_grad_(True)
    loss = matcher.loss(
        NetworkRunner(net, FP32, "cpu"), driver.Batch(None, syn_ours.view(NUM_CLASSES, ipc, *SHAPE), None)
    )
    grad_images, grad_lr = torch.autograd.grad(loss, [syn_ours, matcher.syn_lr])

    generator.set_state(
        saved
    )  # the matcher's draws of the expert and the start epoch (the reference's: numpy)
    expert = int(torch.randint(EXPERTS, (1,), generator=generator))
    start_epoch = int(torch.randint(cfg.max_start_epoch, (1,), generator=generator))
    syn_ref = syn.clone().requires_grad_(True)
    lr_ref = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    expected = reference_mtt_loss(
        net, syn_ref, syn_labels, lr_ref, trajectories.params[expert], start_epoch, cfg, generator, dsa
    )
    expected_images, expected_lr = torch.autograd.grad(expected, [syn_ref, lr_ref])
    assert math.isfinite(float(expected.detach())) and float(expected.detach()) > 0.01
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert relative_error(grad_images, expected_images) < 1e-9
    assert float(grad_lr) == pytest.approx(float(expected_lr), rel=1e-9) and float(expected_lr) != 0


def test_mtt_draws_no_real_batches(planted, monkeypatch):
    """The driver draws no real batch for MTT: the only real draw is the `real` init's, none from noise."""
    draws: list[int] = []
    original = sampling.ClassSampler.sample

    def counted(self, n, generator):
        draws.append(n)
        return original(self, n, generator)

    monkeypatch.setattr(sampling.ClassSampler, "sample", counted)
    run("mtt", planted, init="real")
    assert draws == [TINY["mtt"]["ipc"]]  # the init's
    draws.clear()
    run("mtt", planted, init="noise")
    assert draws == []
    run("dm", planted)
    assert len(draws) == 1 + TINY["dm"]["iterations"]  # DM: the init's and one per iteration


def test_mtt_student_step_is_the_same_with_either_relu_and_leaves_the_network_as_it_is():
    """`mtt.student_step` with MaskReLU (what MTT runs) equals it with nn.ReLU (what the benchmark compares
    against), value and image gradient in float64; the network handed in keeps its nn.ReLUs."""
    net = build_network("convnet3", CHANNELS, NUM_CLASSES, SIZE, width=WIDTH).double()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * NUM_CLASSES, CHANNELS, SIZE, SIZE, generator=generator, dtype=torch.float64)
    labels = torch.arange(NUM_CLASSES).repeat(2)
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    lr = torch.tensor(0.1, dtype=torch.float64)
    outputs = []
    for mask_relu in (True, False):
        pixels = images.clone().requires_grad_(True)
        theta = mtt.student_step(net, FP32, "cpu", mask_relu=mask_relu)(theta0, pixels, labels, lr)
        (grad,) = torch.autograd.grad(theta.square().sum(), pixels)
        outputs.append((theta.detach(), grad))
    assert not torch.equal(outputs[0][0], theta0)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    assert sum(isinstance(m, torch.nn.ReLU) for m in net.modules()) == 3


def test_mtt_learns_its_step_size_and_rejects_what_it_cannot_do(planted):
    images, labels = planted
    result = run("mtt", planted, iterations=10, lr_lr=1e-4)
    learned = float(result.extras[vocab.LEARNED_LR])
    assert learned != TINY["mtt"]["lr_teacher"] and 0 < learned < 1
    frozen = run("mtt", planted, iterations=10, lr_lr=1e-30)  # a negligible rate keeps the initial value
    assert float(frozen.extras[vocab.LEARNED_LR]) == pytest.approx(TINY["mtt"]["lr_teacher"], rel=1e-6)
    cfg = METHODS["mtt"].config(**{**TINY["mtt"], "max_start_epoch": EXPERT_EPOCHS, "expert_epochs": 2})
    with pytest.raises(
        ConfigError, match=r"distill\.mtt\.max_start_epoch - 1 \+ distill\.mtt\.expert_epochs = 5 "
    ):
        METHODS["mtt"](images, labels, NUM_CLASSES, cfg, net_factory, torch.Generator(), progress=False,
                       upstream=trajectories_for(planted))  # fmt: skip
    cfg = METHODS["mtt"].config(**TINY["mtt"])
    with pytest.raises(ValueError, match="needs its expert trajectories"):
        METHODS["mtt"](images, labels, NUM_CLASSES, cfg, net_factory, torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="takes no debiased targets"):
        METHODS["mtt"](images, labels, NUM_CLASSES, cfg, net_factory, torch.Generator(), progress=False,
                       upstream=trajectories_for(planted), debias=sampling.DebiasTargets())  # fmt: skip
    other = build_network("convnet3", CHANNELS, NUM_CLASSES, SIZE, width=WIDTH * 2)
    with pytest.raises(ValueError, match="recorded for another network"):
        METHODS["mtt"](images, labels, NUM_CLASSES, cfg, lambda g: other, torch.Generator(), progress=False,
                       upstream=trajectories_for(planted))  # fmt: skip


def test_gradient_distance_ignores_vectors_and_counts_rows():
    weight = torch.randn(4, 3, 3, 3)
    bias = torch.randn(4)
    # identical gradients: 0; opposite: 2 per row (4 rows); biases never count
    assert float(dc.gradient_distance([weight, bias], [weight, -bias])) == pytest.approx(0, abs=1e-6)
    assert float(dc.gradient_distance([weight, bias], [-weight, bias])) == pytest.approx(8, rel=1e-5)


# --- sampling and init ------------------------------------------------------------------------------


def test_class_sampler_without_then_with_replacement():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 2, 0])  # counts 5, 3, 2
    sampler = sampling.ClassSampler(labels, 3)
    generator = torch.Generator().manual_seed(0)
    picks = sampler.sample(3, generator).view(3, 3)
    for c in range(3):
        assert (labels[picks[c]] == c).all()
    assert len(set(picks[0].tolist())) == 3 and len(set(picks[1].tolist())) == 3  # no repeats
    assert set(picks[2].tolist()) <= {3, 8}  # class 2 has only 2 images: drawn with replacement
    many = sampler.sample(4, generator).view(3, 4)
    assert len(set(many[0].tolist())) == 4
    with pytest.raises(ValueError, match="have no images"):
        sampling.ClassSampler(torch.tensor([0, 0, 2]), 3)


def test_reinitialise_draws_default_init_range():
    net = net_factory(torch.Generator().manual_seed(0))
    assert driver.can_reinitialise(net)
    before = [p.clone() for p in net.parameters()]
    driver.reinitialise_(net, torch.Generator().manual_seed(1))
    conv = net.features[0]
    bound = 1 / (conv.weight[0].numel() ** 0.5)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    assert not torch.equal(before[0], conv.weight)
    assert torch.equal(net.features[1].weight, torch.ones_like(net.features[1].weight))


# --- config validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_validation(method):
    cls = METHODS[method].config
    assert from_dict(cls, TINY[method], f"distill.{method}") == cls(**TINY[method])
    with pytest.raises(ValueError, match=rf"distill\.{method}\.ipc"):
        cls(**{**TINY[method], "ipc": 0})
    with pytest.raises(ValueError, match="momentum_img"):
        cls(**{**TINY[method], "momentum_img": 1.0})
    with pytest.raises(ValueError, match=r"\['noise', 'real'\]"):
        from_dict(cls, {**TINY[method], "init": "zeros"}, f"distill.{method}")
    with pytest.raises(ValueError, match=r"\['noise', 'real'\]"):
        cls(**{**TINY[method], "init": "zeros"})
    with pytest.raises(KeyError, match="unknown"):
        from_dict(cls, {**TINY[method], "outer_loops": 3}, f"distill.{method}")
    with pytest.raises(ValueError, match="iterations"):
        from_dict(cls, {**TINY[method], "iterations": 2.5}, f"distill.{method}")


# --- debiased targets (the rest lives in tests/test_debias.py) -----------------------------------------


def test_gradient_distance_per_class_sums_to_the_total():
    generator = torch.Generator().manual_seed(2)
    grads_syn = [torch.randn(NUM_CLASSES, 4, 3, 3, 3, generator=generator), torch.randn(NUM_CLASSES, 4)]
    grads_real = [torch.randn(NUM_CLASSES, 4, 3, 3, 3, generator=generator), torch.randn(NUM_CLASSES, 4)]
    per_class = dc.gradient_distance_per_class(grads_syn, grads_real)
    assert per_class.shape == (NUM_CLASSES,)
    assert ((per_class >= 0) & (per_class <= 2 * 4)).all()  # 4 rows, each 1 - cos in [0, 2]
    total = dc.gradient_distance(grads_syn, grads_real, leading=1)
    assert float(per_class.sum()) == pytest.approx(float(total), rel=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_debias_none_keyword_is_the_plain_method(method, planted):
    assert torch.equal(run(method, planted).images, run(method, planted, debias=None).images)


def test_weighted_init_draws_distinct_weighted_images(planted):
    images, labels = planted
    weights = torch.zeros(len(labels))
    for c in range(NUM_CLASSES):
        weights[torch.nonzero(labels == c).squeeze(1)[:3]] = 1.0  # 3 images per class carry all weight
    sampler = sampling.WeightedClassSampler(labels, weights, NUM_CLASSES)
    generator = torch.Generator().manual_seed(0)
    picks = sampler.sample_distinct(3, generator).view(NUM_CLASSES, 3)
    for c in range(NUM_CLASSES):
        assert (labels[picks[c]] == c).all() and (weights[picks[c]] > 0).all()
        assert len(set(picks[c].tolist())) == 3  # without replacement
    assert (weights[sampler.sample(50, generator)] > 0).all()
    syn = driver.init_synthetic(images, sampler, 2, "real", generator)
    assert any(torch.equal(syn[0], images[i]) for i in torch.nonzero(weights > 0).squeeze(1))


# --- a new method is one file and one registry entry ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyConfig(driver.DistillConfig):
    """A toy method's params (`distill.toy`): the driver's fields plus one of its own."""

    SECTION = "distill.toy"
    scale: float = 1.0


class PixelMeanMatching:
    """A toy method: match each class's mean image (no network involved)."""

    steps = 1

    def __init__(self, cfg: ToyConfig, context: driver.Context) -> None:
        self.scale = cfg.scale

    def start(self, runner) -> None:
        pass

    def loss(self, runner, batch: driver.Batch) -> torch.Tensor:
        return self.scale * ((batch.real.mean(1) - batch.syn.mean(1)) ** 2).sum()

    def between(self, runner, syn) -> None:
        raise AssertionError("one step per iteration: never called")


@pytest.fixture
def toy(monkeypatch):
    entry = driver.Method("toy", ToyConfig, PixelMeanMatching, uses_dsa=False)
    monkeypatch.setitem(METHODS, "toy", entry)
    return entry


def test_a_toy_method_registered_from_a_test_runs_through_the_driver(toy, planted, tmp_path):
    images, labels = planted
    cfg = from_dict(
        ToyConfig,
        dict(ipc=2, iterations=30, lr_img=1.0, momentum_img=0.5, batch_real=8, init="noise"),
        "distill.toy",
    )
    result = METHODS["toy"](
        images, labels, NUM_CLASSES, cfg, net_factory, torch.Generator().manual_seed(0), progress=False
    )
    assert result.images.shape == (NUM_CLASSES * 2, CHANNELS, SIZE, SIZE) and len(result.losses) == 30
    assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5])  # the driver optimises the method's loss
    for c in range(NUM_CLASSES):  # and the images moved to the class means
        target = images[labels == c].mean(0)
        assert (
            result.images[2 * c : 2 * c + 2].mean(0) - target
        ).abs().mean() < 0.3 * target.abs().mean() + 0.1
    # the driver's services come for free: checkpoints and bit-identical resume
    states: list[dict] = []
    METHODS["toy"](
        images,
        labels,
        NUM_CLASSES,
        cfg,
        net_factory,
        torch.Generator().manual_seed(0),
        progress=False,
        on_checkpoint=states.append,
        checkpoint_every=10,
    )
    resumed = METHODS["toy"](
        images,
        labels,
        NUM_CLASSES,
        cfg,
        net_factory,
        torch.Generator().manual_seed(5),
        progress=False,
        resume=states[0],
    )
    assert torch.equal(resumed.images, result.images) and resumed.losses == result.losses
    # and the stage's configuration picks it up from params like any other method
    from biasdd.pipeline import distill as distill_stage

    params = tiny_params(tmp_path)
    params["distill"]["toy"] = {**dataclasses.asdict(cfg), "scale": 2.0}
    setup = distill_stage.configure(params, "toy")
    assert setup.cfg == dataclasses.replace(cfg, scale=2.0) and setup.dsa is None
    with pytest.raises(ValueError, match=r"distill\.toy\.scale: 'big' is not valid"):
        distill_stage.configure(
            {**params, "distill": {**params["distill"], "toy": {**params["distill"]["toy"], "scale": "big"}}},
            "toy",
        )
