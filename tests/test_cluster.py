"""biasdd.study.cluster: the study's grid on a real two-node Ray cluster, the experiments sent back
through DVC.

Unit tests first (no cluster, about a second): the worker's command, cell selection, the status file, and
failed cells under the report's tables.

Then the cluster tests (marker `cluster`; about 4 minutes on 2 CPU cores, most of it the tiny cells
themselves, run twice: on the cluster and on the local DVC queue). Everything stays on the loopback range:
- a Ray head on 127.0.0.2 and a second node on 127.0.0.3 (`ray start`, free ports, object store capped,
  usage stats and dashboard off), both stopped by PID at the end: raylets first, gcs_server last;
- SeaweedFS on 127.0.0.1 as the S3 DVC remote (as tests/test_sharing.py), a bare git repository as
  the git remote;
- a tiny copy of the project (tests/tiny.py, DM with 16 iterations so a cell can be killed mid-run);
- `biasdd-cluster run` with three DM-only cells at once; one cell's worker is SIGKILLed in the middle of
  its distillation, and Ray's retry resumes it from its checkpoint; after `dvc exp pull` the report's
  tables equal those of the same three cells run on the local DVC queue;
- the driver again, with one more cell whose params are bad: the three finished cells are skipped, the
  bad one fails once (one attempt) and is listed as failed under the report's Table 1.
While the cluster works, the test checks every socket of the processes involved: none may be connected
to an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from biasdd import vocab
from biasdd.study import cluster, grid, report, tables, tools

from .test_sharing import ACCESS_KEY, BUCKET, SECRET_KEY, _free_ports, seaweedfs
from .tiny import make_repo, tiny

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # Ray reserves ~7 GiB of /dev/shm per node by default
# three DM-only cells of the grid `--ratios 0.5 --severity-sweep`: Table 1's DM row at rho 0 and 1, Table 2
POINTS = [(0.0, 4), (1.0, 1), (1.0, 4)]  # in grid order
CELLS = [
    grid.GridCell("cmnist", ratio, severity, "quick", methods=grid.SWEEP_METHODS)
    for ratio, severity in POINTS
]
BAD_CELL = grid.GridCell("cmnist", 1.5, 4, "quick", methods=grid.SWEEP_METHODS)  # bias_inject rejects it
TABLES = [f"table{t}_{split}.{ext}" for t in (1, 2) for split in vocab.TEST_SPLITS for ext in ("csv", "md")]


# --- unit tests ----------------------------------------------------------------------------------------


def test_worker_command_is_the_grid_command_without_queue():
    table1 = grid.GridCell("cmnist", 0.8, 4, "paper")
    assert cluster.worker_command(table1) == [
        "dvc", "exp", "run", "--pull", "-n", "cmnist-rho0.8-sev4-paper",
        "-S", "dataset=cmnist", "-S", "bias_ratio=0.8", "-S", "severity=4", "-S", "budget=paper",
    ]  # fmt: skip
    sweep = grid.GridCell("ccifar10", 1.0, 2, "quick", methods=grid.SWEEP_METHODS)
    command = cluster.worker_command(sweep, cpu=True)
    assert command[-4:] == ["-S", "methods=[dm]", "-S", "device=cpu"] and "--queue" not in command
    assert command[:6] == ["dvc", "exp", "run", "--pull", "-n", "ccifar10-dm-rho1-sev2-quick"]
    variant = grid.grid_cells(["cmnist"], [0.95], extra=["distill.repeats=3"])[0]  # --set distill.repeats=3
    command = cluster.worker_command(variant)
    assert command[5] == "cmnist-rho0.95-sev4-quick-distill.repeats-3"
    assert command[-2:] == ["-S", "distill.repeats=3"]


def test_select_cells_keeps_grid_order_and_rejects_unknown_names():
    cells = grid.grid_cells(["cmnist"], [0.0, 0.5, 1.0])
    names = [
        c.name for c in cluster.select_cells(cells, ["cmnist-rho1-sev4-quick", "cmnist-rho0-sev4-quick"])
    ]
    assert names == ["cmnist-rho0-sev4-quick", "cmnist-rho1-sev4-quick"]
    assert cluster.select_cells(cells, None) == cells
    with pytest.raises(ValueError, match="--only: cmnist-rho7 not in this grid; its cells: cmnist-rho0-sev4"):
        cluster.select_cells(cells, ["cmnist-rho7"])


def test_status_file_merges_and_report_lists_failed_cells(tmp_path):
    status = tmp_path / "cluster-status.json"
    ok = cluster.CellResult.for_cell(CELLS[0], "success", "f" * 40, attempts=2, node=HEAD_IP)
    bad = cluster.CellResult.for_cell(BAD_CELL, "failed", "f" * 40, attempts=1, error="ValueError: rho")
    cluster.write_status(status, [ok])
    cluster.write_status(status, [bad])  # a later run adds its cells, keeps the others
    records = cluster.read_status(status)
    assert records[ok.name]["state"] == "success" and records[ok.name]["attempts"] == 2
    failed = tables.read_failed_cells(status)
    assert [r["name"] for r in failed] == [BAD_CELL.name]
    sweep = grid.GridCell("cmnist", 1.0, 2, "quick", methods=grid.SWEEP_METHODS)
    cluster.write_status(status, [cluster.CellResult.for_cell(sweep, "failed", "f" * 40, attempts=4)])
    failed = tables.read_failed_cells(status)
    assert [n.split()[7] for n in tables.failed_notes(failed, "quick", "table1")] == [BAD_CELL.name]
    assert [n.split()[7] for n in tables.failed_notes(failed, "quick", "table2")] == [sweep.name]
    assert tables.failed_notes(failed, "paper", "table1") == ()
    written = report.write_report([], tmp_path / "out", failed)  # no metrics at all: tables with the notes
    assert list(written) == ["quick"]
    markdown = (tmp_path / "out/quick/table1_test_conflicting.md").read_text()
    assert markdown.endswith(
        f"\n\n- FAILED on the cluster, no result: {BAD_CELL.name} (attempts: 1; ValueError: rho)\n"
    )
    assert "FAILED" not in (tmp_path / "out/quick/table1_test_conflicting.csv").read_text()
    assert tables.read_failed_cells(tmp_path / "absent.json") == []
    variant = grid.grid_cells(["cmnist"], [0.5], extra=["distill.repeats=3"])[0]
    cluster.write_status(status, [cluster.CellResult.for_cell(variant, "failed", "f" * 40, attempts=1)])
    notes = tables.failed_notes(tables.read_failed_cells(status), "quick", "table1")
    assert f"{variant.name} (a variant: --set distill.repeats=3) (attempts: 1;" in notes[-1]


# --- the cluster ---------------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    """What every process started here gets: this venv first on PATH, no telemetry, S3 credentials."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        DVC_NO_ANALYTICS="1",
        MPLBACKEND="Agg",
        BIASDD_WORKERS="1",
        AWS_ACCESS_KEY_ID=ACCESS_KEY,  # the workers' credentials for the S3 remote, as on a real cluster
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        GIT_AUTHOR_NAME="biasdd-test",
        GIT_AUTHOR_EMAIL="test@biasdd.invalid",
        GIT_COMMITTER_NAME="biasdd-test",
        GIT_COMMITTER_EMAIL="test@biasdd.invalid",
    )
    return env


def _run(cwd: Path, *cmd: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=env or _environment(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout + result.stderr


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (parent, cmdline)
    return table


def _tree(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found, grew = set(roots), True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie is gone
    except OSError:
        return False


def _stop_pids(pids: set[int], timeout: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in [p for p in pids if _alive(p)]:
        os.kill(pid, signal.SIGKILL)


@dataclass
class RayCluster:
    address: str
    temp_dir: Path  # every Ray process of this cluster has it on its command line

    def pids(self) -> set[int]:
        table = _procs()
        roots = {pid for pid, (_, cmd) in table.items() if str(self.temp_dir) in cmd and pid != os.getpid()}
        return _tree(roots, table)  # + workers, agents and what the workers run

    def stop(self) -> None:
        """By PID, in the order that works: raylets (and their workers), the rest, gcs_server last."""
        table = _procs()
        pids = self.pids()
        raylets = {p for p in pids if "/raylet/raylet" in table[p][1]}
        gcs = {p for p in pids if "gcs_server" in table[p][1]}
        _stop_pids(_tree(raylets, table))
        _stop_pids(pids - _tree(raylets, table) - gcs)
        _stop_pids(gcs)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head on 127.0.0.2 (2 CPU slots) and a node on 127.0.0.3 (1 slot): three cells at once."""
    temp_dir = Path(tempfile.mkdtemp(prefix="bdray-", dir="/tmp"))  # short: Ray's socket paths must fit
    port, dashboard, agent_head, agent_node = _free_ports(4)
    address = f"{HEAD_IP}:{port}"
    common = ["--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
    ray = str(Path(sys.executable).parent / "ray")
    head = [
        ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=false", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_head}", f"--temp-dir={temp_dir}/head", *common,
    ]  # fmt: skip
    node = [
        ray, "start", f"--address={address}", f"--node-ip-address={NODE_IP}", "--num-cpus=1",
        f"--dashboard-agent-listen-port={agent_node}", f"--temp-dir={temp_dir}/node", *common,
    ]  # fmt: skip
    handle = RayCluster(address, temp_dir)
    try:
        _run(temp_dir, *head, timeout=120)
        _run(temp_dir, *node, timeout=120)
        deadline = time.monotonic() + 60
        while True:  # the node has joined when the head counts 3 CPUs
            status = _run(temp_dir, ray, "status", f"--address={address}", timeout=60)
            if "0.0/3.0 CPU" in status:
                break
            assert time.monotonic() < deadline, status
            time.sleep(1)
        yield handle
    finally:
        handle.stop()
        leftover = [p for p in handle.pids() if _alive(p)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes still running after the stop: {leftover}"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """SeaweedFS on 127.0.0.1, for the whole module (tests/test_sharing.py starts one per test)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


def _tiny_dm16(budget: dict) -> None:
    """The tiny config, with DM long enough (16 iterations, a checkpoint after each) to be killed mid-run."""
    budget["distill"]["dm"]["iterations"] = 16


@dataclass
class Study:
    repo: Path  # the driver's repository
    git_url: str  # the bare git remote
    work_dir: Path  # the cells' clones (both "nodes" share this machine's disk)
    reports: Path


@pytest.fixture(scope="module")
def study(tmp_path_factory, s3_endpoint) -> Study:
    """A tiny project with the S3 remote in its committed config, and an empty bare git remote."""
    root = tmp_path_factory.mktemp("study")
    repo = make_repo(root, tiny(_tiny_dm16))
    bare = root / "remote.git"
    _run(root, "git", "init", "--quiet", "--bare", "-b", "main", str(bare))
    _run(repo, "dvc", "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/cluster")
    _run(repo, "dvc", "remote", "modify", "s3remote", "endpointurl", s3_endpoint)
    _run(repo, "dvc", "remote", "modify", "--local", "s3remote", "access_key_id", ACCESS_KEY)
    _run(repo, "dvc", "remote", "modify", "--local", "s3remote", "secret_access_key", SECRET_KEY)
    _run(repo, "git", "commit", "--quiet", "-am", "S3 remote")
    _run(repo, "git", "remote", "add", "origin", str(bare))
    return Study(repo, str(bare), root / "work", root / "reports")


def _proc_net_address(field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of a /proc/net/{tcp,udp}[6] `ADDR:PORT` field (hex, in 32-bit little-endian words)."""
    raw = bytes.fromhex(field.split(":")[0])
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback (127.0.0.0/8, ::1, ::ffff:127.x) or unspecified (a listening or unconnected socket)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_unspecified or ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _sockets(pids: set[int]) -> tuple[int, list[str]]:
    """How many sockets of `pids` there are, and those connected to an address outside 127.0.0.0/8."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[int(link[8:-1])] = pid
        except OSError:
            continue  # gone meanwhile
    seen, outside = 0, []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            pid = inodes.get(int(fields[9]))
            if pid is None:
                continue
            seen += 1
            remote = _proc_net_address(fields[2])
            if not _is_local(remote):
                outside.append(f"{table} pid {pid} ({_procs().get(pid, (0, '?'))[1][:60]}) -> {remote}")
    return seen, outside


def test_proc_net_addresses_are_read_right():
    """The loopback check below is only as good as this decoding (examples from a Linux /proc/net)."""
    assert str(_proc_net_address("0100007F:1F90")) == "127.0.0.1"
    assert str(_proc_net_address("0300007F:9C41")) == "127.0.0.3"
    assert str(_proc_net_address("0202000A:0050")) == "10.0.2.2" and not _is_local(
        _proc_net_address("0202000A:0")
    )
    assert _is_local(_proc_net_address("00000000:0000"))  # listening
    assert str(_proc_net_address("00000000000000000000000001000000:0")) == "::1"
    mapped = _proc_net_address("0000000000000000FFFF00000200007F:0")
    assert str(mapped.ipv4_mapped) == "127.0.0.2" and _is_local(mapped)
    assert not _is_local(_proc_net_address("B80D0120000000000000000001000000:0"))  # 2001:db8::1


@dataclass
class FirstRun:
    returncode: int
    output: str
    killed: str  # the cell whose worker was SIGKILLed
    records: dict
    sockets_seen: int
    foreign: list[str]
    seconds: float


@pytest.fixture(scope="module")
def first_run(ray_cluster, study) -> FirstRun:
    """`biasdd-cluster run` of the three cells; one worker is SIGKILLed when its cell has a checkpoint."""
    env = _environment()
    command = [
        str(Path(sys.executable).parent / "biasdd-cluster"), "run",
        "--address", ray_cluster.address, "--node-ip-address", HEAD_IP,
        "--git-remote", "origin", "--dvc-remote", "s3remote", "--cpu", "--work-dir", str(study.work_dir),
        "--datasets", "cmnist", "--ratios", "0.5", "--severity-sweep",
        "--only", *(c.name for c in CELLS),
    ]  # fmt: skip
    log_path = study.repo.parent / "driver-1.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        driver = subprocess.Popen(command, cwd=study.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed, seen, foreign, last_check = None, 0, [], 0.0
        try:
            while driver.poll() is None:
                # a guard against a hung driver, not a speed check: every cell now also runs experts@<method>
                assert time.monotonic() - start < 900, "gave up on the cluster run after 15 minutes"
                if killed is None:
                    for checkpoint in study.work_dir.glob("*/*/repo/data/checkpoints/dm_repeat*.pt"):
                        cell_dir = checkpoint.parents[3]
                        worker = json.loads((cell_dir / "attempt.json").read_text())["pid"]
                        os.kill(worker, signal.SIGKILL)  # the Ray worker running this cell, mid-distillation
                        killed = cell_dir.name
                        break
                if time.monotonic() - last_check > 2:
                    pids = ray_cluster.pids() | _tree({driver.pid}, _procs())
                    count, outside = _sockets(pids)
                    seen, foreign = seen + count, foreign + outside
                    last_check = time.monotonic()
                time.sleep(0.05)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    return FirstRun(
        returncode=driver.returncode,
        output=log_path.read_text(),
        killed=killed or "",
        records=cluster.read_status(study.repo / tools.CLUSTER_STATUS),
        sockets_seen=seen,
        foreign=foreign,
        seconds=time.monotonic() - start,
    )


def _report(repo: Path, out: Path) -> dict[str, str]:
    _run(repo, str(Path(sys.executable).parent / "biasdd-report"), "--out", str(out))
    return {name: (out / "quick" / name).read_text() for name in TABLES}


@pytest.mark.cluster
@pytest.mark.slow
def test_grid_on_ray_survives_a_killed_worker_and_matches_the_local_queue(first_run, study, tmp_path):
    run = first_run
    assert run.returncode == 0, run.output
    assert run.killed in {c.name for c in CELLS}, f"no cell was caught mid-distillation:\n{run.output}"
    assert run.sockets_seen > 50 and not run.foreign, run.foreign  # checked, and none went outside
    assert "download of cmnist: computed once, on 127.0.0." in run.output
    records = run.records
    assert {name: r["state"] for name, r in records.items()} == {c.name: "success" for c in CELLS}
    # the killed cell: retried by Ray, resumed from its checkpoint; the others ran once
    assert {name: r["attempts"] for name, r in records.items()} == {
        c.name: 2 if c.name == run.killed else 1 for c in CELLS
    }
    retry_log = Path(records[run.killed]["log"]).read_text()
    assert "resuming dm repeat" in retry_log, retry_log
    # three at once, on both nodes
    spans = [(r["started"], r["started"] + r["seconds"]) for r in records.values()]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    assert {r["node"] for r in records.values()} == {HEAD_IP, NODE_IP}
    # `download` ran once, in the dataset's preparation; every cell restored it from DVC's run cache
    for record in records.values():
        first_log = Path(record["log"]).with_name("attempt-1.log").read_text()
        assert "Stage 'download' is cached - skipping run" in first_log, first_log
        assert "Running stage 'download'" not in first_log
    # every experiment is on the git remote and in the driver's repository
    assert cluster.finished_on_remote(
        study.git_url, _run(study.repo, "git", "rev-parse", "HEAD").strip()
    ) == {c.name for c in CELLS}
    local_exps = _run(study.repo, "dvc", "exp", "list", "--name-only").split()
    assert sorted(local_exps) == sorted(c.name for c in CELLS)
    on_cluster = _report(study.repo, study.reports / "cluster")
    assert "| DM |" in on_cluster["table1_test_conflicting.md"]

    # the same three cells on the local DVC queue, in a clone of the same base commit
    local = tmp_path / "local"
    _run(tmp_path, "git", "clone", "--quiet", study.git_url, str(local))
    base = _run(study.repo, "git", "rev-parse", "HEAD").strip()
    _run(local, "git", "checkout", "--quiet", "--detach", base)
    assert grid.queue(CELLS, local) == 0
    env = _environment()
    env["OMP_NUM_THREADS"] = "1"  # as Ray gives a task of one CPU: the same float arithmetic
    started = grid.start_queue(local, 2, env=env)
    assert started.returncode == 0, started.stdout
    counts = grid.wait(local, poll_s=3, timeout_s=400)
    assert counts == {"Success": 3}, _run(local, "dvc", "queue", "logs", CELLS[0].name)
    _run(local, "dvc", "queue", "stop")
    on_queue = _report(local, tmp_path / "reports")
    for name in TABLES:
        assert on_cluster[name] == on_queue[name], name
    table1 = {
        row.split(",")[0]: row.split(",")[1:]
        for row in on_cluster["table1_test_conflicting.csv"].splitlines()
    }
    assert sum(bool(v) for v in table1["DM"]) == 2  # CMNIST-DD at rho 0 and 1
    table2 = {
        row.split(",")[0]: row.split(",")[1:]
        for row in on_cluster["table2_test_conflicting.csv"].splitlines()
    }
    assert [bool(v) for v in table2["CMNIST-DD rho=0"]] == [False, False, False, True]
    assert [bool(v) for v in table2["CMNIST-DD rho=1"]] == [True, False, False, True]


@pytest.mark.cluster
@pytest.mark.slow
def test_rerun_skips_finished_cells_and_a_bad_cell_fails_once(first_run, ray_cluster, study):
    assert first_run.returncode == 0, first_run.output
    before = _report(study.repo, study.reports / "before")
    script = (
        "import json, logging, sys\n"
        "from pathlib import Path\n"
        "from biasdd.study import cluster, grid\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"points = {[*POINTS, (1.5, 4)]!r}\n"
        "cells = [grid.GridCell('cmnist', r, s, 'quick', methods=grid.SWEEP_METHODS) for r, s in points]\n"
        f"results = cluster.run_grid(cells, address={ray_cluster.address!r}, git_remote='origin',\n"
        f"    dvc_remote='s3remote', cpu=True, work_dir={str(study.work_dir)!r},\n"
        f"    node_ip_address={HEAD_IP!r})\n"
        "print(json.dumps({r.name: [r.state, r.attempts, r.error] for r in results}))\n"
    )
    logs = {p: p.stat().st_mtime_ns for c in CELLS for p in study.work_dir.glob(f"*/{c.name}/log/*.log")}
    assert len(logs) == 4  # attempt-1 of each, attempt-2 of the killed one
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=study.repo, env=_environment(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    assert {name: state for name, (state, _, _) in results.items()} == {
        **{c.name: "skipped" for c in CELLS},
        BAD_CELL.name: "failed",
    }, result.stderr
    _, attempts, error = results[BAD_CELL.name]
    assert attempts == 1, result.stderr  # a failure of the cell's own: not retried
    assert "bias_ratio" in error and "1.5" in error, error
    for path, mtime in logs.items():  # the finished cells did not run again: their logs are untouched
        assert path.stat().st_mtime_ns == mtime, path
    records = cluster.read_status(study.repo / tools.CLUSTER_STATUS)  # the first run's records are kept
    assert {c.name: records[c.name]["state"] for c in CELLS} == {c.name: "success" for c in CELLS}
    assert records[first_run.killed]["attempts"] == 2 and records[BAD_CELL.name]["attempts"] == 1
    grid_options = ["--git-remote", "origin", "--datasets", "cmnist", "--ratios", "0.5", "--severity-sweep"]
    todo = "cmnist-dm-rho0-sev1-quick"
    status = _run(
        study.repo, "biasdd-cluster", "status", *grid_options, "--only", todo, *(c.name for c in CELLS)
    )
    assert [line.split(maxsplit=1) for line in status.splitlines() if line.startswith("cmnist")] == [
        [todo, "to run"],
        *([c.name, "done"] for c in CELLS),
    ]
    dry = _run(study.repo, "biasdd-cluster", "run", "--dry-run", "--address", "127.0.0.2:1",
               "--dvc-remote", "s3remote", "--cpu", *grid_options, "--only", todo)  # fmt: skip
    assert f"dvc exp run --pull -n {todo} -S dataset=cmnist -S bias_ratio=0 -S severity=1" in dry
    after = _report(study.repo, study.reports / "after")
    listed = f"- FAILED on the cluster, no result: {BAD_CELL.name} (attempts: 1; "
    assert listed in after["table1_test_conflicting.md"] and listed in after["table1_test_uniform.md"]
    for name in TABLES:  # the tables themselves are unchanged (the failed cell has no numbers)
        if name.endswith(".csv"):
            assert after[name] == before[name], name
