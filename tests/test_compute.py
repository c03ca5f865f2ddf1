"""biasdd.training.compute: the stated tolerances of bf16, compiled == eager, chunked == one pass, and the
fall-back when compiling fails, the CPU allocator's thresholds, the warning of emulated bf16."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from biasdd.distill import dc, dm, driver, mtt
from biasdd.training import compute, runtime
from biasdd.training.compute import ComputeConfig, NetworkRunner
from biasdd.training.nets import build_network
from biasdd.training.trainer import TrainConfig, train_networks

K, SIZE, WIDTH = 4, 16, 16
BF16 = ComputeConfig(precision="bf16")
# The stated tolerances of bf16 autocast (docs/protocol.md §10): relative change of a matching loss,
# cosine of the image gradient, and evaluation accuracy in points.
LOSS_RTOL, GRAD_COSINE, ACCURACY_POINTS = 0.02, 0.99, 3.0


def _net(seed: int = 0) -> torch.nn.Module:
    return build_network("convnet3", 3, K, SIZE, WIDTH, generator=torch.Generator().manual_seed(seed))


def _planted(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class a colour and a bar, plus noise: learnable by a small ConvNet."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(per_class)
    colours = torch.randn(K, 3, 1, 1, generator=generator)
    images = colours[labels] + 0.8 * torch.randn(len(labels), 3, SIZE, SIZE, generator=generator)
    for c in range(K):
        images[labels == c, :, 3 * c : 3 * c + 3, :] += 1.5
    return images, labels


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def _dm_loss_and_grad(runner_compute: ComputeConfig, seed: int = 0) -> tuple[float, torch.Tensor]:
    images, _ = _planted(64, seed)
    net = _net(seed).requires_grad_(False)
    real = images.view(K, 64, 3, SIZE, SIZE)
    syn = real[:, :8].clone().requires_grad_(True)
    loss = dm.embedding_loss(net, real, syn, NetworkRunner(net, runner_compute, "cpu"))
    (grad,) = torch.autograd.grad(loss, [syn])
    return float(loss.detach()), grad


def test_bf16_dm_loss_and_gradient_within_tolerance():
    for seed in range(3):
        loss32, grad32 = _dm_loss_and_grad(compute.FP32, seed)
        loss16, grad16 = _dm_loss_and_grad(BF16, seed)
        assert abs(loss16 - loss32) / loss32 < LOSS_RTOL, (loss16, loss32)
        assert _cosine(grad16, grad32) > GRAD_COSINE


def test_bf16_dc_matching_loss_within_tolerance():
    images, _ = _planted(32, 1)
    real = images.view(K, 32, 3, SIZE, SIZE)
    for seed in range(3):
        net = _net(seed)
        syn = real[:, :4].clone() + 0.1
        losses = []
        for setting in (compute.FP32, BF16):
            runner = NetworkRunner(net, setting, "cpu")
            losses.append(float(dc.matching_loss(net, real, syn, dc.ClassGradients(False), runner).detach()))
        assert abs(losses[1] - losses[0]) / losses[0] < LOSS_RTOL, losses


def _mtt_loss_and_grads(setting: ComputeConfig, seed: int = 0) -> tuple[float, torch.Tensor, float]:
    """MTT's loss, image gradient and step-size gradient: 10 student steps on 8 images per class, matched
    to 2 epochs of a plain-SGD expert on the planted set."""
    images, labels = _planted(32, seed)
    expert = _net(100 + seed)
    optimizer = torch.optim.SGD(expert.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    snapshots = [torch.cat([p.detach().reshape(-1) for p in expert.parameters()])]
    for _ in range(3):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 16):
            index = order[start : start + 16]
            loss = torch.nn.functional.cross_entropy(expert(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        snapshots.append(torch.cat([p.detach().reshape(-1) for p in expert.parameters()]))
    trajectories = mtt.Trajectories(torch.stack(snapshots)[None], *mtt.layout(expert))
    cfg = mtt.MTTConfig(ipc=8, iterations=1, lr_img=100.0, momentum_img=0.5, batch_real=8, init="real",
                        syn_steps=10, expert_epochs=2, max_start_epoch=2, lr_lr=1e-5, lr_teacher=0.01,
                        batch_syn=None)  # fmt: skip
    labels8 = driver.class_labels(K, 8, "cpu")
    context = driver.Context(K, 8, labels8, None, None, generator, torch.device("cpu"), trajectories)
    matcher = mtt.TrajectoryMatching(cfg, context)
    runner = NetworkRunner(_net(seed), setting, "cpu")
    matcher.start(runner)
    syn = images.view(K, 32, 3, SIZE, SIZE)[:, :8].clone().requires_grad_(True)
    loss = matcher.loss(runner, driver.Batch(None, syn, None))
    grad_images, grad_lr = torch.autograd.grad(loss, [syn, matcher.syn_lr])
    return float(loss.detach()), grad_images, float(grad_lr)


def test_bf16_mtt_loss_and_gradients_within_tolerance():
    for seed in range(3):
        loss32, images32, lr32 = _mtt_loss_and_grads(compute.FP32, seed)
        loss16, images16, lr16 = _mtt_loss_and_grads(BF16, seed)
        assert abs(loss16 - loss32) / loss32 < LOSS_RTOL, (loss16, loss32)
        assert _cosine(images16, images32) > GRAD_COSINE
        assert abs(lr16 - lr32) / abs(lr32) < LOSS_RTOL, (lr16, lr32)


def test_bf16_evaluation_accuracy_within_tolerance():
    train_images, train_labels = _planted(24, 2)
    test_images, test_labels = _planted(100, 3)
    cfg = TrainConfig(
        epochs=15, lr=0.02, momentum=0.9, weight_decay=5e-4, batch_size=48, lr_milestones=(10,), lr_gamma=0.1
    )
    accuracy = {}
    for name, setting in (("fp32", compute.FP32), ("bf16", BF16)):
        ensemble = train_networks(
            train_images,
            train_labels,
            lambda g: build_network("convnet3", 3, K, SIZE, WIDTH, generator=g),
            cfg,
            [torch.Generator().manual_seed(s) for s in (0, 1)],
            progress=False,
            compute=setting,
        )
        predictions = ensemble.predict(test_images, compute=setting)
        accuracy[name] = 100 * float((predictions == test_labels).double().mean())
    assert accuracy["fp32"] > 60  # the task is learnt at all
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= ACCURACY_POINTS, accuracy


def test_chunked_embedding_equals_one_pass():
    net = _net().requires_grad_(False)
    images, _ = _planted(100, 4)  # 400 images: 3 full chunks of 128 and a rest
    runner = NetworkRunner(net, compute.FP32, "cpu")
    assert runner.chunk == compute.CPU_CHUNK < images.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(runner.embed_chunks(images), net.embed(images), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_passes_match_eager():
    """torch.compile on the CPU: the DM loss and its image gradient, once the shapes are hot."""
    eager_loss, eager_grad = _dm_loss_and_grad(compute.FP32)
    net = _net().requires_grad_(False)
    runner = NetworkRunner(net, ComputeConfig(compile=True), "cpu")
    images, _ = _planted(64, 0)
    real = images.view(K, 64, 3, SIZE, SIZE)
    for _ in range(compute.Compiled.COMPILE_AFTER + 1):
        syn = real[:, :8].clone().requires_grad_(True)
        loss = dm.embedding_loss(net, real, syn, runner)
        (grad,) = torch.autograd.grad(loss, [syn])
    assert (
        runner._embed.compiled is not None
        and max(runner._embed.seen.values()) > compute.Compiled.COMPILE_AFTER
    )
    assert abs(loss.item() - eager_loss) / eager_loss < 1e-4
    assert _cosine(grad, eager_grad) > 0.9999


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_mtt_student_matches_eager(precision):
    """MTT's student step through torch.compile (its double backward included) against eager."""
    eager = _mtt_loss_and_grads(ComputeConfig(precision, False))
    compiled = _mtt_loss_and_grads(ComputeConfig(precision, True))
    assert abs(compiled[0] - eager[0]) / eager[0] < (1e-4 if precision == "fp32" else LOSS_RTOL)
    assert _cosine(compiled[1], eager[1]) > (0.9999 if precision == "fp32" else GRAD_COSINE)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("InductorError: CppCompileError: C++ compiler not found")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = _net().requires_grad_(False)
    runner = NetworkRunner(net, ComputeConfig(compile=True), "cpu")
    x = torch.randn(8, 3, SIZE, SIZE)
    with caplog.at_level(logging.WARNING, logger="biasdd.training.compute"), torch.no_grad():
        outs = [runner.embed(x) for _ in range(compute.Compiled.COMPILE_AFTER + 2)]
    assert "torch.compile failed" in caplog.text and caplog.text.count("torch.compile failed") == 1
    with torch.no_grad():
        assert all(torch.equal(out, net.embed(x)) for out in outs)


def test_compile_only_on_the_cpu():
    assert ComputeConfig(compile=True).compiles_on("cpu")
    assert not ComputeConfig(compile=True).compiles_on("cuda")
    assert not ComputeConfig(compile=False).compiles_on("cpu")


GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# After tune_cpu_allocator: live blocks of 1 and 24 MiB come from the heap, not from mmap (mallinfo's
# hblks counts the mmapped ones; mallinfo2 from glibc 2.33, mallinfo's int fields before). glibc's
# default threshold starts at 128 KiB and rises only as mapped blocks are freed: without the call, after
# importing torch, this script printed [0, 1] (the 24 MiB block mapped).
_HEAP_CHECK = """
import ctypes, sys
from biasdd.training.compute import tune_cpu_allocator
libc = ctypes.CDLL(None)
wide = hasattr(libc, "mallinfo2")
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t if wide else ctypes.c_int) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]
mallinfo = libc.mallinfo2 if wide else libc.mallinfo
mallinfo.restype = MallInfo
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
assert tune_cpu_allocator()
mapped = []
for size in (1 << 20, 24 << 20):
    before = mallinfo().hblks
    block = libc.malloc(size)
    mapped.append(mallinfo().hblks - before)
    libc.free(block)
print(mapped)
"""


def test_cpu_allocator_thresholds_set_only_on_glibc(monkeypatch):
    for name in compute.ALLOCATOR_THRESHOLDS:
        monkeypatch.delenv(name, raising=False)
    assert compute.tune_cpu_allocator() is GLIBC
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own choice is left alone
    assert compute.tune_cpu_allocator() is False


@pytest.mark.skipif(not GLIBC, reason="mallinfo and mallopt are glibc's")
def test_tuned_allocator_keeps_large_blocks_in_the_heap():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", _HEAP_CHECK], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[0, 0]", result.stderr


def test_training_stages_tune_the_allocator_when_they_start_not_when_validated(monkeypatch):
    """`run_config` (every stage's `configure`) only validates; `start` (the work) tunes and leases."""
    calls, leases = [], []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: calls.append(True) or True)
    monkeypatch.setattr(runtime, "lease_device", lambda name: leases.append(name) or "cpu")
    run = runtime.run_config({**_stage_params("fp32"), "device": "auto"})
    assert (run.device, calls, leases) == ("auto", [], [])
    assert runtime.start(run).device == "cpu"
    assert (calls, leases) == ([True], ["auto"])


def _cpu_probes(monkeypatch, machine: str, avx512_bf16: bool | None, amx: bool | None) -> None:
    """This process's CPU as `cpu_bf16_native` sees it; a probe of None is missing from torch."""
    monkeypatch.setattr(compute.platform, "machine", lambda: machine)
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)


@pytest.mark.parametrize(
    ("machine", "avx512_bf16", "amx", "expected"),
    [
        ("x86_64", False, False, False),  # AVX2 or AVX-512 without BF16: bf16 emulated
        ("x86_64", True, False, True),  # Zen 4, Cooper Lake
        ("AMD64", False, True, True),  # Sapphire Rapids and later (AMX)
        ("x86_64", None, False, None),  # a torch without the probe: cannot tell
        ("arm64", False, False, None),  # not x86: cannot tell from these probes
    ],
)
def test_cpu_bf16_native_reads_the_cpu_probes(monkeypatch, machine, avx512_bf16, amx, expected):
    _cpu_probes(monkeypatch, machine, avx512_bf16, amx)
    assert compute.cpu_bf16_native() is expected


def _stage_params(precision: str) -> dict:
    return {
        "dataset": "cmnist",
        "seed": 0,
        "budget": "quick",
        "device": "cpu",
        "model": {"net": "convnet3", "width": 8},
        "compute": {"precision": precision, "compile": False},
    }


@pytest.mark.parametrize(
    ("precision", "native", "warned"),
    [("bf16", False, True), ("bf16", True, False), ("bf16", None, False), ("fp32", False, False)],
)
def test_training_stages_warn_of_bf16_on_a_cpu_without_it(monkeypatch, caplog, precision, native, warned):
    monkeypatch.setattr(compute, "cpu_bf16_native", lambda: native)
    with caplog.at_level(logging.WARNING, logger="biasdd.training.compute"):
        run = runtime.run_config(_stage_params(precision))
        assert not caplog.records  # validating warns of nothing; starting the work does
        runtime.start(run)
    messages = [r.getMessage() for r in caplog.records if r.name == "biasdd.training.compute"]
    if warned:
        assert messages == [compute.BF16_EMULATED]
        assert "compute.precision=fp32" in messages[0] and "\n" not in messages[0]  # the key and the fix
    else:
        assert messages == []
