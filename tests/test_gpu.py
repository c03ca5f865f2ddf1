"""The accelerator paths against the CPU paths (marked `gpu`: they run where CUDA is, e.g. through
`benchmarks/gpu_check.sh`, and are skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from biasdd.distill import METHODS, dc, mtt
from biasdd.training.augment import DSAConfig
from biasdd.training.compute import FP32, ComputeConfig, NetworkRunner
from biasdd.training.nets import build_network
from biasdd.training.trainer import TrainConfig, train_networks

pytestmark = pytest.mark.gpu

K, SIZE, WIDTH = 4, 16, 16
DSA = DSAConfig("color_crop_cutout_scale_rotate", 0.125, 0.5, 1.2, 15.0, 1.0, 2.0, 0.5)


def _factory(device: str):
    return lambda g: build_network("convnet3", 3, K, SIZE, WIDTH, generator=g).to(device)


def _net(device: str, seed: int = 0) -> torch.nn.Module:
    return _factory(device)(torch.Generator().manual_seed(seed))


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(n)
    return torch.randn(len(labels), 3, SIZE, SIZE, generator=g) + labels.view(-1, 1, 1, 1) * 0.5, labels


def test_vmapped_class_gradients_on_cuda_equal_the_cpu_loop():
    images, _ = _data(8)
    real = images.view(K, 8, 3, SIZE, SIZE)
    syn = real[:, :2].clone()
    losses = []
    for device, batched in (("cpu", False), ("cuda", True)):
        net = _net(device)
        s = syn.to(device).requires_grad_(True)
        loss = dc.matching_loss(
            net, real.to(device), s, dc.ClassGradients(batched), NetworkRunner(net, FP32, device)
        )
        (grad,) = torch.autograd.grad(loss, [s])
        losses.append((float(loss), grad.cpu()))
    assert abs(losses[0][0] - losses[1][0]) / losses[0][0] < 1e-3
    assert (
        torch.nn.functional.cosine_similarity(losses[0][1].flatten(), losses[1][1].flatten(), dim=0) > 0.999
    )


def test_stacked_training_on_cuda_equals_one_by_one_on_the_cpu():
    images, labels = _data(6)
    cfg = TrainConfig(
        epochs=3, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=16, lr_milestones=(2,), lr_gamma=0.1
    )
    nets = []
    for device in ("cpu", "cuda"):
        ensemble = train_networks(
            images.to(device),
            labels.to(device),
            _factory(device),
            cfg,
            [torch.Generator().manual_seed(s) for s in (0, 1)],
            progress=False,
        )
        nets.append({k: v.cpu() for k, v in ensemble.params.items()})
    for name in nets[0]:
        torch.testing.assert_close(nets[1][name], nets[0][name], atol=1e-4, rtol=1e-3, msg=name)


def _trajectories(epochs: int = 3) -> mtt.Trajectories:
    """Stand-in expert trajectories: an init plus growing random steps (MTT's maths runs on any)."""
    net = _net("cpu", 5)
    g = torch.Generator().manual_seed(5)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    steps = 0.01 * torch.randn(epochs, start.numel(), generator=g)
    params = torch.cat([start[None], start + steps.cumsum(0)])[None]  # (1, epochs + 1, P)
    return mtt.Trajectories(params, *mtt.layout(net))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_methods_run_on_cuda_and_are_deterministic(method, precision):
    images, labels = _data(12)
    images, labels = images.cuda(), labels.cuda()
    values = dict(ipc=2, iterations=3, lr_img=0.1, momentum_img=0.5, batch_real=8, init="real")
    extra = {}
    if method in ("dc", "dsa"):
        values.update(outer_loop=2, inner_loop=1, lr_net=0.01, batch_train=8)
    if method == "mtt":
        values.update(
            syn_steps=3, expert_epochs=1, max_start_epoch=2, lr_lr=1e-5, lr_teacher=0.01, batch_syn=None
        )
        extra["upstream"] = _trajectories()
    cfg = METHODS[method].config(**values)
    runs = [
        METHODS[method](
            images,
            labels,
            K,
            cfg,
            _factory("cuda"),
            torch.Generator().manual_seed(0),
            dsa=DSA,
            compute=ComputeConfig(precision, False),
            progress=False,
            **extra,
        )
        for _ in range(2)
    ]
    assert runs[0].images.shape == (K * 2, 3, SIZE, SIZE) and all(
        torch.isfinite(torch.tensor(runs[0].losses))
    )
    torch.testing.assert_close(runs[0].images, runs[1].images, atol=1e-5, rtol=1e-4)


def test_mtt_on_cuda_equals_the_cpu():
    """MTT's unrolled student (eager on accelerators, `torch.func.grad`) against the CPU's, fp32."""
    trajectories = _trajectories()
    cfg = METHODS["mtt"].config(
        ipc=2, iterations=2, lr_img=100.0, momentum_img=0.5, batch_real=8, init="real", syn_steps=3,
        expert_epochs=1, max_start_epoch=2, lr_lr=1e-5, lr_teacher=0.01, batch_syn=None,
    )  # fmt: skip
    images, labels = _data(12)
    results = [
        METHODS["mtt"](
            images.to(device),
            labels.to(device),
            K,
            cfg,
            _factory(device),
            torch.Generator().manual_seed(0),
            dsa=None,
            progress=False,
            upstream=trajectories,
        )  # fmt: skip
        for device in ("cpu", "cuda")
    ]
    torch.testing.assert_close(results[1].images, results[0].images, atol=1e-4, rtol=1e-3)
    assert results[1].losses == pytest.approx(results[0].losses, rel=1e-3)
