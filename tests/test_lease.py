"""biasdd.training.lease: one GPU per process among experiments running side by side, on faked device counts.

The leases are real (flock'ed lock files in a temporary directory); only the number of GPUs is faked
(`device_count=`), so this runs on the CPU. Several real processes take leases at once and must never
share a device; a SIGKILLed holder must free its device. ~5 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from biasdd.training import lease

# A holder process: leases one of `count` fake GPUs, proves it is alone on it (O_EXCL marker), holds it.
HOLDER = """
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from biasdd.training.lease import lease_device
out, hold, count = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
device = lease_device("auto", device_count=count, poll_s=0.02)
print(device, flush=True)
start = time.time()
fd = os.open(out / f"{device}.busy", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError if shared
time.sleep(hold)
os.close(fd)
os.unlink(out / f"{device}.busy")
(out / f"{os.getpid()}.json").write_text(json.dumps({"device": device, "start": start, "end": time.time()}))
"""


@pytest.fixture
def lease_env(tmp_path, monkeypatch) -> Path:
    """A private lock directory, and this process's lease state reset before and after."""
    directory = tmp_path / "leases"
    monkeypatch.setenv(lease.LEASE_DIR_ENV, str(directory))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lease.release_device()
    yield directory
    lease.release_device()


def _holder(out: Path, hold_s: float, count: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(hold_s), str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_device_keys_name_the_physical_card():
    assert lease.device_keys(3) == ["0", "1", "2"]
    assert lease.device_keys(2, visible="2,3") == ["2", "3"]  # this process's cuda:0 is card 2
    assert lease.device_keys(2, visible="GPU-aa, MIG-bb") == ["GPU-aa", "MIG-bb"]
    assert lease.device_keys(2, visible="5") == ["5", "1"]  # more devices than entries: indices
    uuids = ["1b2c-4d", None]
    assert lease.device_keys(2, visible="2,3", uuids=uuids) == ["GPU-1b2c-4d", "3"]  # a UUID wins


def test_explicit_devices_and_bad_values(lease_env):
    assert lease.lease_device("cpu") == "cpu"
    assert lease.lease_device("cuda:3", device_count=1) == "cuda:3"  # pinned by the user: no lease
    assert lease.lease_device("auto", device_count=0) == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        lease.lease_device("cuda", device_count=0)
    with pytest.raises(ValueError, match="'gpu' is not valid; choose one of auto, cpu, cuda, cuda:N"):
        lease.lease_device("gpu")
    assert lease.held_lease() is None and not any(lease_env.glob("*.lock"))


def test_lease_is_held_for_the_process_and_reused(lease_env):
    assert lease.lease_device("auto", device_count=2) == "cuda:0"
    assert lease.lease_device("cuda", device_count=2) == "cuda:0"  # one lease per process
    held = lease.held_lease()
    assert held is not None and held.key == "0" and held.path == lease_env / "0.lock"
    assert held.path.read_text().startswith(f"pid {os.getpid()} on ")
    # flock is per open file: a second acquisition in this process competes like another process would
    other = lease.acquire(lease.device_keys(2), lease_env)
    assert other.index == 1
    with pytest.raises(TimeoutError, match="every GPU stayed leased"):
        lease.acquire(lease.device_keys(2), lease_env, poll_s=0.01, timeout_s=0.05)
    os.close(other.fd)
    assert lease.acquire(lease.device_keys(2), lease_env).index == 1  # released: free again


def test_different_visible_sets_do_not_clash(lease_env, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # like a Ray task given card 1
    assert lease.lease_device("auto", device_count=1) == "cuda:0"
    assert lease.held_lease().key == "1"
    # a process that sees both cards gets card 0; one more finds both cards leased
    both = lease.device_keys(2)
    assert lease.acquire(both, lease_env).key == "0"
    with pytest.raises(TimeoutError):
        lease.acquire(both, lease_env, poll_s=0.01, timeout_s=0.05)
    assert "all 2 GPUs are leased by other processes" in caplog.text and f"pid {os.getpid()}" in caplog.text


def test_processes_taking_leases_at_once_never_share(lease_env, tmp_path):
    """Six processes, three fake GPUs: each device holds one process at a time, the rest wait."""
    out = tmp_path / "out"
    out.mkdir()
    holders = [_holder(out, 0.6, 3) for _ in range(6)]
    for holder in holders:
        _, stderr = holder.communicate(timeout=60)
        assert holder.returncode == 0, stderr  # FileExistsError here would mean two shared a device
    spans = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(spans) == 6
    assert {s["device"] for s in spans} == {"cuda:0", "cuda:1", "cuda:2"}
    for device in ("cuda:0", "cuda:1", "cuda:2"):
        mine = sorted((s["start"], s["end"]) for s in spans if s["device"] == device)
        for (_, end), (start, _) in zip(mine, mine[1:], strict=False):
            assert start >= end, f"{device} held by two processes at once: {mine}"
    # three ran at once, then three waited: the waiters started after some holder finished
    first_end = min(s["end"] for s in spans)
    assert sum(s["start"] < first_end for s in spans) == 3


def test_sigkilled_holder_frees_its_device(lease_env, tmp_path):
    first_out, second_out = tmp_path / "first", tmp_path / "second"  # the killed one cannot tidy up
    first_out.mkdir()
    second_out.mkdir()
    first = _holder(first_out, 600, 1)
    assert first.stdout.readline().strip() == "cuda:0"
    second = _holder(second_out, 0.1, 1)
    time.sleep(1.0)
    assert second.poll() is None  # waiting: the only device is taken
    killed_at = time.time()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    stdout, stderr = second.communicate(timeout=30)
    assert second.returncode == 0, stderr
    assert stdout.strip() == "cuda:0"
    (span,) = [json.loads(p.read_text()) for p in second_out.glob("*.json")]
    assert span["start"] >= killed_at  # it got the device only once the holder was dead
    assert "all 1 GPUs are leased by other processes" in stderr and f"pid {first.pid} on " in stderr
    assert "is free now: leased" in stderr
