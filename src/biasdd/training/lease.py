"""GPU leases: experiments running side by side on one machine each get a GPU of their own.

`dvc queue start -j 8` on an 8-GPU box runs eight experiments at once, and with `device: auto` every one
of them used to take `cuda:0`. `lease_device("auto")` instead takes an exclusive lease on a free GPU and
returns `cuda:<k>` for it; the lease lasts until the process exits. Run as many queue workers as there
are GPUs (`dvc queue start -j <number of GPUs>`); a stage that finds every GPU leased waits for one
(one log line) rather than share a card.

How: one lock file per physical device, held with `fcntl.flock` on a descriptor kept open for the
process's lifetime. The kernel drops a flock when the last descriptor of it closes, so a lease ends with
its process however that ends: normal exit, exception, SIGKILL, out-of-memory kill. Nothing has to clean
up after a crash and no lease can go stale.

A device's lock file is named after the physical card, not after its index in this process: the GPU's
UUID where torch reports one, else its entry in `CUDA_VISIBLE_DEVICES` (an index, `GPU-<uuid>` or
`MIG-<uuid>`), else its index. So processes that see different sets of cards (`CUDA_VISIBLE_DEVICES=2,3`
in one, unset in another) never take the same card twice; a process that sees one card (a Ray task
given one GPU) leases that one.

The lock directory is `$BIASDD_LEASE_DIR`, default `<system temp dir>/biasdd-gpu-leases` (sticky and
world-writable like `/tmp`, so users sharing a box share the leases). It must be on a local file system
of the machine: flock over NFS is not reliable.

Cost: a few milliseconds per stage (the devices' properties are read once to name them).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LEASE_DIR_ENV = "BIASDD_LEASE_DIR"
LEASED = ("auto", "cuda")  # requests that lease a free card; "cpu" and "cuda:N" are taken as given


@dataclass(frozen=True)
class Lease:
    """A held lease: `index` is the device's index in this process (`cuda:<index>`)."""

    index: int
    key: str
    path: Path
    fd: int

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


_lock = threading.Lock()
_held: Lease | None = None  # at most one lease per process, kept until exit (or release_device)


def lease_dir() -> Path:
    """Where the lock files live: `$BIASDD_LEASE_DIR` or `<tmp>/biasdd-gpu-leases`."""
    return Path(os.environ.get(LEASE_DIR_ENV) or Path(tempfile.gettempdir()) / "biasdd-gpu-leases")


def device_keys(
    count: int, visible: str | None = None, uuids: Sequence[str | None] | None = None
) -> list[str]:
    """One name per visible device (index 0..count-1) that identifies the physical card.

    `visible` is the value of CUDA_VISIBLE_DEVICES (None = unset: the indices are physical);
    `uuids` are the devices' UUIDs where known (they win, being unambiguous across processes).
    """
    entries = [e.strip() for e in visible.split(",")] if visible is not None else []
    keys = []
    for index in range(count):
        uuid = uuids[index] if uuids is not None and index < len(uuids) else None
        if uuid:
            keys.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        elif index < len(entries) and entries[index]:
            keys.append(entries[index])
        else:
            keys.append(str(index))
    return keys


def _cuda_keys() -> list[str]:
    """The keys of this process's CUDA devices; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    uuids = []
    for index in range(count):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        uuids.append(str(uuid) if uuid else None)
    return device_keys(count, os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)


def _lock_path(directory: Path, key: str) -> Path:
    return directory / f"{key.replace('/', '_')}.lock"


def _open_lock(directory: Path, key: str) -> tuple[int, Path]:
    if not directory.exists():
        with contextlib.suppress(FileExistsError):
            directory.mkdir(parents=True)
            os.chmod(directory, 0o1777)  # shared like /tmp: every user's processes lease from one pool
    path = _lock_path(directory, key)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError as error:
        raise PermissionError(
            f"cannot open the GPU lease file {path}: {error.strerror}; "
            f"set {LEASE_DIR_ENV} to a directory you can write"
        ) from None
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o666)  # whoever creates it lets other users take the same card's lease
    return fd, path


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def acquire(
    keys: Sequence[str],
    directory: Path | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> Lease:
    """Lease the first free device of `keys` (index = position in `keys`), waiting while all are taken.

    Raises TimeoutError after `timeout_s` seconds (None = wait as long as it takes).
    """
    if not keys:
        raise ValueError("no device to lease: the list of device keys is empty")
    directory = directory or lease_dir()
    start = time.monotonic()
    said = False
    while True:
        for index, key in enumerate(keys):
            fd, path = _open_lock(directory, key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            if said:
                log.info("GPU %s (cuda:%d) is free now: leased", key, index)
            return Lease(index, key, path, fd)
        if timeout_s is not None and time.monotonic() - start >= timeout_s:
            raise TimeoutError(f"every GPU stayed leased for {timeout_s:g} s ({', '.join(keys)})")
        if not said:
            holders = "; ".join(f"{k}: {_holder(_lock_path(directory, k))}" for k in keys)
            log.warning(
                "all %d GPUs are leased by other processes (%s); waiting for one to be released "
                "(run at most one experiment per GPU: dvc queue start -j %d)",
                len(keys),
                holders,
                len(keys),
            )
            said = True
        time.sleep(poll_s)


def lease_device(
    requested: str = "auto",
    *,
    device_count: int | None = None,
    directory: Path | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> str:
    """The device this process should use: `cpu` without CUDA, else `cuda:<k>` on a card leased to it.

    `auto` and `cuda` lease a free card (held until the process exits; a second call returns the same
    one); `cpu` and `cuda:N` are returned as they are (an explicit choice is not second-guessed).
    `device_count` replaces torch's count of visible devices (tests fake GPUs with it; the keys then
    come from CUDA_VISIBLE_DEVICES or the indices).
    """
    global _held
    if requested == "cpu" or (requested.startswith("cuda:") and requested[5:].isdigit()):
        return requested
    if requested not in LEASED:
        raise ValueError(f"device: {requested!r} is not valid; choose one of auto, cpu, cuda, cuda:N")
    with _lock:
        if _held is not None:
            return _held.device
        if device_count is None:
            keys = _cuda_keys()
        else:
            keys = device_keys(device_count, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if not keys:
            if requested == "cuda":
                raise ValueError("device: 'cuda' asked for, but no CUDA device is available; use auto or cpu")
            return "cpu"
        _held = acquire(keys, directory, poll_s=poll_s, timeout_s=timeout_s)
        log.info("leased GPU %s as %s (lock %s)", _held.key, _held.device, _held.path)
        return _held.device


def held_lease() -> Lease | None:
    """This process's lease, if it holds one."""
    return _held


def release_device() -> None:
    """Give the lease back before the process ends (exiting does the same)."""
    global _held
    with _lock:
        if _held is not None:
            os.close(_held.fd)  # closing the last descriptor drops the flock
            _held = None
