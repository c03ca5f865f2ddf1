"""How the networks run: numeric precision, `torch.compile` on the CPU, cache-sized chunks.

The `compute` params section holds the two settings that can change results at float round-off:

- `precision`: `fp32`, or `bf16` = `torch.autocast` with bfloat16 around network passes (matrix maths
  in bf16 with fp32 accumulation; autocast keeps norms, softmax and losses in fp32). On a CPU with
  AVX-512 bf16 it is ~1.5-2x faster; tests/test_compute.py bounds its effect on losses and accuracy.
- `compile`: run network passes through `torch.compile` (inductor) on the CPU, which fuses instance
  norm, ReLU and pooling into one C++ loop per block (eager PyTorch makes a full pass over a layer's
  activations for each op; the profile of a DM iteration was 40% convolution, 41% norm/ReLU/pool).
  The first call of each input shape compiles (seconds; cached on disk by inductor). If compiling
  fails (no C++ compiler), biasdd warns once and runs eagerly. On accelerators it is not used: their
  batched (vmap) paths are kept as they are.

On the CPU a network pass over many images is also cut into chunks of `CPU_CHUNK` images, so that a
layer's activations stay in cache (one pass over 640 images at width 32 is ~100 MB per layer);
each image's output does not depend on its batch-mates (instance norm), so chunking changes nothing
but float round-off. Accelerators run whole batches.

A training stage on the CPU also fixes glibc's allocator thresholds (`tune_cpu_allocator`). By default
glibc maps allocations above a threshold (128 KiB at first, raised only as mapped blocks are freed) with
fresh pages from the kernel, and hands freed memory at the heap's top back beyond a trim threshold, so a
training loop's batches and activations can pay their page faults again and again. Fixed thresholds
keep such blocks in the heap: the same results, less time (the full set's stage 19% less, DC's
distillation unchanged; benchmarks/RESULTS.md).

bf16 is fast only where the processor computes it: on an x86 CPU without AVX-512 BF16 or AMX (AMD's
before Zen 4, most Intel processors before Sapphire Rapids, laptops' among them) it is emulated and
slower than fp32, so a training stage asked for bf16 there warns once, with the fix
(`warn_if_bf16_emulated`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from biasdd.config import Config

log = logging.getLogger(__name__)

CPU_CHUNK = 128  # images per network pass on the CPU (measured: 64-128 fastest at width 32 and 128)
_COMPILE_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, OSError, ImportError, AssertionError)


@dataclass(frozen=True)
class ComputeConfig(Config):
    """The `compute` params section."""

    SECTION: ClassVar[str] = "compute"

    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast around network passes
    compile: bool = False  # torch.compile network passes on the CPU

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The autocast context for network passes on `device` (a no-op for fp32)."""
        device_type = torch.device(device).type
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def compiles_on(self, device: torch.device | str) -> bool:
        return self.compile and torch.device(device).type == "cpu"


FP32 = ComputeConfig()

# glibc's mallopt parameters and the values set: blocks up to 32 MiB (the largest threshold glibc
# accepts) come from the heap, whose top is given back to the kernel only beyond 64 MiB free.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}


def tune_cpu_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (the effect of the environment variables
    `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864`); True when set.

    Changes no result, only where freed memory goes. Left as it is where either variable is already set
    (the user's choice) and where the C library is not glibc (macOS, musl: nothing to do).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ALLOCATOR_THRESHOLDS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLDS["MALLOC_MMAP_THRESHOLD_"])
        and mallopt(M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLDS["MALLOC_TRIM_THRESHOLD_"])
    )


def cpu_bf16_native() -> bool | None:
    """Whether this CPU has bf16 instructions (x86: AVX-512 BF16 or AMX), from torch's CPU probes; None
    where that cannot be told (another architecture, or a torch without the probes)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    if any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)


BF16_EMULATED = (
    "compute.precision is bf16, but this CPU has no bf16 instructions (neither AVX-512 BF16 nor AMX): "
    "bf16 is emulated here, 2-6x slower than fp32 (benchmarks/RESULTS.md). For speed, run with "
    "`-S compute.precision=fp32` (e.g. `dvc exp run -S compute.precision=fp32`): its numbers differ "
    "from bf16's within the tolerance of docs/protocol.md §10"
)


def warn_if_bf16_emulated(compute: ComputeConfig) -> bool:
    """Log `BF16_EMULATED` (True) when `compute` asks for bf16 on a CPU known to lack bf16 instructions.

    Only a warning: bf16 stays what the params say, so a run's numbers do not depend on the machine's
    instruction set beyond round-off; the user chooses fp32 for speed.
    """
    if compute.precision != "bf16" or cpu_bf16_native() is not False:
        return False
    log.warning(BF16_EMULATED)
    return True


class Compiled:
    """`fn` through `torch.compile` when asked for (CPU only), else `fn` itself.

    Compiling costs seconds per input shape, so only hot shapes are compiled: a call runs eagerly
    until its (shapes, grad mode) has been seen `after` times (default `COMPILE_AFTER`). A training loop's
    main batch compiles after a few steps; a one-off shape (the last, partial batch of an epoch) stays
    eager instead of triggering a recompilation. `after=1` compiles every shape from its first call, so
    that a run resumed from a checkpoint computes exactly what an uninterrupted one does (eager and
    compiled code differ in round-off). `options`: inductor settings for this function only. If
    compiling fails (no C++ compiler), one warning, then eager for good.
    """

    COMPILE_AFTER = 4

    def __init__(
        self,
        fn: Callable[..., Any],
        enabled: bool,
        after: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.fn = fn
        compiled = torch.compile(fn, dynamic=False, options=options) if enabled else None
        self.compiled: Callable[..., Any] | None = compiled
        self.seen: dict[tuple, int] = {}
        self.after = self.COMPILE_AFTER if after is None else after  # 1: compiled from the first call

    def __call__(self, *args: Tensor) -> Any:
        if self.compiled is not None:
            key = (*((tuple(a.shape), a.dtype) for a in args), torch.is_grad_enabled())
            count = self.seen.get(key, 0) + 1
            self.seen[key] = count
            if count >= self.after:
                try:
                    return self.compiled(*args)
                except _COMPILE_ERRORS as error:  # a backend failure surfaces at the first call
                    if not _is_compile_failure(error):
                        raise
                    log.warning(
                        "torch.compile failed (%s); running eagerly", str(error).splitlines()[0][:200]
                    )
                    self.compiled = None
        return self.fn(*args)


def _is_compile_failure(error: BaseException) -> bool:
    """Compiler/backend errors (no C++ compiler, inductor failure), not errors of the maths itself."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError

        if isinstance(error, BackendCompilerFailed):
            return True
        if isinstance(error, TorchRuntimeError):
            return False
    except ImportError:  # pragma: no cover - very old torch
        pass
    text = f"{type(error).__name__}: {error}"
    return any(key in text for key in ("InductorError", "CppCompileError", "compiler", "BackendCompiler"))


class NetworkRunner:
    """Runs one network's passes under the compute settings: autocast, compile on the CPU, and
    (for `embed_chunks`) cache-sized chunks on the CPU.

    `net` keeps its parameters; the compiled functions read them at every call, so in-place
    re-initialisation (fresh networks) and optimiser steps need no recompilation. `compile_after`: see
    `Compiled`.
    """

    def __init__(
        self,
        net: nn.Module,
        compute: ComputeConfig,
        device: torch.device | str,
        compile_after: int | None = None,
    ) -> None:
        self.net = net
        self.compute = compute
        self.device = torch.device(device)
        enabled = compute.compiles_on(self.device)
        self._forward = Compiled(net, enabled, compile_after)
        self._embed = Compiled(net.embed, enabled, compile_after) if hasattr(net, "embed") else None
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits of `x` (float32 under bf16 autocast), differentiable."""
        with self.compute.autocast(self.device):
            return full_precision(self._forward(x.contiguous()))  # one layout: compiled graphs guard strides

    def embed(self, x: Tensor) -> Tensor:
        """Features before the classifier of `x` (float32 under bf16 autocast), differentiable, one pass."""
        if self._embed is None:
            raise ValueError("network: this network has no `embed` method (features before the head)")
        with self.compute.autocast(self.device):
            return full_precision(self._embed(x.contiguous()))

    def embed_chunks(self, x: Tensor) -> Tensor:
        """`embed` over cache-sized chunks on the CPU (one pass on accelerators); for no-grad passes."""
        if not self.chunk or x.shape[0] <= self.chunk:
            return self.embed(x)
        return torch.cat([self.embed(part) for part in x.split(self.chunk)])

    def forward_chunks(self, x: Tensor) -> Tensor:
        """`forward` over cache-sized chunks on the CPU; for no-grad passes (scoring)."""
        if not self.chunk or x.shape[0] <= self.chunk:
            return self.forward(x)
        return torch.cat([self.forward(part) for part in x.split(self.chunk)])


def full_precision(x: Tensor) -> Tensor:
    """bf16/fp16 results (of autocast) as float32; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def chunks(count: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive chunks of at most `size` (all of `count` when size is 0)."""
    size = size or count
    for start in range(0, count, size):
        yield start, min(start + size, count)
