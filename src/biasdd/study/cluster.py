"""Run the study's grid on a Ray cluster: one Ray task per cell, each experiment sent back through DVC.

    biasdd-cluster run --address HEAD_IP:6379 --git-remote URL --dvc-remote NAME \\
        [--datasets cmnist ccifar10] [--ratios 0 0.1 0.5 0.8 0.95 1] [--severity-sweep] [--budget quick]
        [--only CELL ...] [--cpu] [--cpus-per-cell 1] [--max-retries 3] [--work-dir DIR]
        [--node-ip-address IP] [--dry-run]
    biasdd-cluster status --git-remote URL [the same grid options]   # which cells are done, which failed
    biasdd-report                                                     # Tables 1-2, as from a local queue

Cost: the cells' own time divided by the GPUs (or CPU slots) of the cluster, plus ~5 s per cell of git
and DVC transfers; docs/cluster.md has the cost model and measured times.

What the driver (`run`) does, in the repository it is started in:
1. the grid's cells (`biasdd.study.grid.grid_cells`, the options of `biasdd-grid queue`); a cell whose
   experiment is already on the git remote (`refs/exps/<base>/<name>`) is skipped, so re-running the
   driver only runs what is missing or failed;
2. pushes the committed HEAD (the experiments' base commit) to the git remote as
   `refs/biasdd/bases/<sha>` (branches are not touched);
3. one Ray task per dataset first runs `download` and pushes it with DVC's run cache, so every cell of
   the cluster restores it instead of computing it again (`bias_inject`, `bias_model` and the other
   cacheable stages likewise come from the run cache on a re-run);
4. one Ray task per cell, asking for one GPU (or `--cpus-per-cell` CPUs with `--cpu`); Ray schedules
   them over the cluster and retries a cell whose worker died (`--max-retries`);
5. as cells finish, records them in `reports/cluster-status.json` (which `biasdd-report` reads to list
   failed cells under its tables); at the end `dvc exp pull`s every finished experiment.

What a cell's task does, on its node, in `<work-dir>/<base>/<cell>/` (stable, so a retry on the same
node finds the distillation checkpoints of the attempt that died and resumes from them): fetch the base
commit from the git remote (the first time into a new repository) and check it out; `dvc exp run --pull
-n <cell> -S ...` (the cell's `biasdd-grid` command without `--queue`; `--pull` fetches missing inputs
and DVC's run cache from the DVC remote); `dvc push --run-cache` (outputs and run cache to the DVC
remote); `dvc exp push origin <cell>` (the experiment to the git remote). A cell that fails for its own
reason (non-zero exit of one of these commands) returns a failure record: Ray does not retry it. Only
a dead worker is retried.

Every node needs this package installed in the same Python environment as `ray start` (its stages run
`python` and `dvc` from there, with the clone's own `src/` first on PYTHONPATH so the cell runs the base
commit's code), git access to the git remote, and the DVC remote's credentials in its environment
(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY before `ray start`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from biasdd.study.grid import GridCell, add_grid_options, grid_cells
from biasdd.study.tools import CLUSTER_STATUS, tool_command, tool_environment

log = logging.getLogger(__name__)

BASE_REF_PREFIX = "refs/biasdd/bases/"
EXP_REF_PREFIX = "refs/exps/"
PREPARE_STAGE = "download"  # what every cell of a dataset shares: computed once per dataset and base
LOCK_WAIT_S = 300.0  # how long a retry waits for the processes of the attempt that died to be gone
TAIL_CHARS = 4000


class CellError(Exception):
    """A command of a cell failed for the cell's own reason (not a dead worker): not retried."""


@dataclass(frozen=True)
class CellSpec:
    """Everything a cell's task needs, in plain types (it travels to the worker)."""

    name: str
    command: list[str]  # `dvc exp run --pull -n <name> -S ...`
    base: str  # the experiment's base commit
    git_url: str
    dvc_remote: str
    work_dir: str | None  # None = <tmp>/biasdd-cluster on the worker node
    push: bool = True  # False for the per-dataset preparation: only its run cache is pushed


@dataclass
class CellResult:
    """What happened to one cell; one entry of `reports/cluster-status.json`."""

    name: str
    state: str  # success, failed, skipped (already on the git remote)
    dataset: str | None = None
    bias_ratio: float | None = None
    severity: int | None = None
    budget: str | None = None
    methods: list[str] | None = None  # None = all of params.yaml's
    extra: list[str] | None = None  # `--set` overrides: a variant of the grid
    base: str | None = None
    attempts: int | None = None  # Ray's attempt number of the last attempt, from 1
    node: str | None = None
    started: float | None = None  # unix time of the last attempt's start
    seconds: float | None = None
    log: str | None = None  # the last attempt's log file, on `node`
    error: str | None = None  # failed: the reason, one line
    details: str | None = field(default=None, repr=False)  # failed: the end of the log

    @classmethod
    def for_cell(cls, cell: GridCell, state: str, base: str, **values: Any) -> CellResult:
        return cls(
            name=cell.name,
            state=state,
            dataset=cell.dataset,
            bias_ratio=cell.bias_ratio,
            severity=cell.severity,
            budget=cell.budget,
            methods=list(cell.methods) if cell.methods else None,
            extra=list(cell.extra) or None,
            base=base,
            **values,
        )


# --- commands --------------------------------------------------------------------------------------


def worker_command(cell: GridCell, cpu: bool = False) -> list[str]:
    """The cell's `biasdd-grid` command without `--queue`, with `--pull` (inputs and run cache from the
    DVC remote), and `-S device=cpu` for a CPU-only run."""
    command = [part for part in cell.command() if part != "--queue"]
    command.insert(3, "--pull")  # dvc exp run --pull ...
    if cpu:
        command += ["-S", "device=cpu"]
    return command


def _git(repo: Path, *args: str) -> str:
    """Run git in `repo` for the driver; a failure is an error that shows git's message."""
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _dvc(repo: Path, *args: str) -> str:
    result = subprocess.run(
        tool_command(["dvc", *args]), cwd=repo, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def finished_on_remote(git_url: str, base: str, cwd: Path | None = None) -> set[str]:
    """Names of the experiments of `base` on the git remote (what `dvc exp push` put there)."""
    prefix = f"{EXP_REF_PREFIX}{base[:2]}/{base[2:]}/"
    refs = _git(cwd or Path.cwd(), "ls-remote", git_url, f"{EXP_REF_PREFIX}*")
    return {
        ref[len(prefix) :]
        for _, ref in (line.split("\t") for line in refs.splitlines())
        if ref.startswith(prefix)
    }


# --- the task that runs on a worker node -----------------------------------------------------------------


def _reason(text: str) -> str:
    """One line that says why a command failed: a stage's one-line error, else the last Python exception
    or DVC error in its output."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("# exit")]
    for pattern in (r"^[\w@]+: error: ", r"^[A-Za-z_.]*(Error|Exception): ", r"^ERROR: "):
        found = [line for line in lines if re.match(pattern, line)]
        if found:
            return found[-1]
    return lines[-1] if lines else "no output"


class _CellRun:
    """One attempt of one cell (or of a dataset's preparation) in its stable directory on this node."""

    def __init__(self, spec: CellSpec, attempt: int | None) -> None:
        root = Path(spec.work_dir) if spec.work_dir else Path(tempfile.gettempdir()) / "biasdd-cluster"
        self.spec = spec
        self.dir = root / spec.base[:12] / spec.name
        self.repo = self.dir / "repo"
        self.attempt = attempt
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log").mkdir(exist_ok=True)
        self.log_path = self.dir / "log" / f"attempt-{attempt or 0}.log"
        self.env = tool_environment()  # this environment's `dvc` and `python` first on PATH
        paths = [str(self.repo / "src"), *filter(None, [self.env.get("PYTHONPATH")])]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)  # the base commit's code, not the installed one
        self.lock_fd: int | None = None

    def lock(self) -> None:
        """Exclusive use of the cell's directory. Ray kills a dead worker's process group, and the lock is
        also held by the commands it runs, so a retry waits here until all of them are gone."""
        self.lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CellError(f"{self.dir} stayed locked for {LOCK_WAIT_S:.0f} s") from None
                time.sleep(1.0)

    def run(self, command: Sequence[str], cwd: Path | None = None) -> None:
        """Run one command, its output appended to the attempt's log; non-zero exit -> CellError."""
        with self.log_path.open("a") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            start = time.monotonic()
            result = subprocess.run(
                tool_command(command),
                cwd=cwd or self.repo,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(self.lock_fd,) if self.lock_fd is not None else (),
                check=False,
            )
            out.write(f"# exit {result.returncode} after {time.monotonic() - start:.1f} s\n")
        if result.returncode != 0:
            text = self.log_path.read_text(errors="replace")
            raise CellError(f"`{' '.join(command[:3])}` exited with {result.returncode}: {_reason(text)}")

    def checkout(self) -> None:
        """The base commit, in a repository kept across attempts (ignored files such as data/checkpoints/
        and the DVC cache survive; tracked files are reset)."""
        spec = self.spec
        if not (self.repo / ".git").exists():  # a repository with the remote; only the base is fetched
            partial = self.dir / "repo.partial"
            shutil.rmtree(partial, ignore_errors=True)  # one cut short by a dead worker
            self.run(["git", "init", "--quiet", "-b", "cell", str(partial)], cwd=self.dir)
            self.run(["git", "remote", "add", "origin", spec.git_url], cwd=partial)
            partial.rename(self.repo)
        (self.repo / ".git" / "index.lock").unlink(missing_ok=True)  # left by a killed git: we hold the lock
        self.run(["git", "fetch", "--quiet", "origin", f"{BASE_REF_PREFIX}{spec.base}"])
        self.run(["git", "checkout", "--quiet", "--force", "--detach", spec.base])
        self.run(["git", "reset", "--quiet", "--hard", spec.base])
        self.run(["dvc", "remote", "default", "--local", spec.dvc_remote])
        stale = [
            ref
            for ref in subprocess.run(
                ["git", "for-each-ref", "--format=%(refname)", EXP_REF_PREFIX],
                cwd=self.repo,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            if ref.endswith(f"/{spec.name}")
        ]
        if stale:  # an attempt that died after committing its experiment but before pushing it
            self.run(["dvc", "exp", "remove", spec.name])


def run_cell(spec: CellSpec, *_after: Any) -> dict[str, Any]:
    """The Ray task of one cell: check out, `dvc exp run`, push; returns a CellResult as a dict.

    A failure of the cell's own making comes back as a record with state `failed` (so Ray does not
    retry it); a dead worker is Ray's to retry. `_after` carries the per-dataset preparation's result,
    only so that Ray starts the cell after it.
    """
    import ray

    attempt = None
    with contextlib.suppress(Exception):  # Ray's own attempt counter (0 = first); internal API
        attempt = ray._private.worker.global_worker.core_worker.get_current_task_attempt_number() + 1
    node = ray.util.get_node_ip_address()
    cell = _CellRun(spec, attempt)
    started = time.time()
    record: dict[str, Any] = {"name": spec.name, "attempts": attempt, "node": node, "started": started}
    record["log"] = str(cell.log_path)
    try:
        cell.lock()
        (cell.dir / "attempt.json").write_text(json.dumps({**record, "pid": os.getpid()}))
        if spec.push and spec.name in finished_on_remote(spec.git_url, spec.base, cwd=cell.dir):
            # an earlier attempt pushed it and died before returning
            return {**record, "state": "success", "seconds": time.time() - started}
        cell.checkout()
        cell.run(spec.command)
        cell.run(["dvc", "push", "--run-cache"])  # outputs and run cache first: the ref must find its data
        if spec.push:
            cell.run(["dvc", "exp", "push", "origin", spec.name])
            shutil.rmtree(cell.repo)  # everything is on the remotes now; the clone would only take space
        return {**record, "state": "success", "seconds": time.time() - started}
    except (CellError, RuntimeError, OSError) as error:
        tail = cell.log_path.read_text(errors="replace")[-TAIL_CHARS:] if cell.log_path.exists() else ""
        return {
            **record,
            "state": "failed",
            "seconds": time.time() - started,
            "error": str(error),
            "details": tail,
        }
    finally:
        if cell.lock_fd is not None:
            os.close(cell.lock_fd)


# --- the driver ------------------------------------------------------------------------------------------


def _base_commit(repo: Path) -> str:
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no").strip()
    if dirty:
        files = ", ".join(line[3:] for line in dirty.splitlines()[:5])
        raise ValueError(
            f"uncommitted changes in {files}: commit them first (every cell runs the committed HEAD)"
        )
    return _git(repo, "rev-parse", "HEAD").strip()


def _git_url(repo: Path, git_remote: str) -> str:
    """A remote's URL when `git_remote` names one of `repo`'s remotes, else `git_remote` as given."""
    remotes = _git(repo, "remote").split()
    return _git(repo, "remote", "get-url", git_remote).strip() if git_remote in remotes else git_remote


def _check_dvc_remote(repo: Path, dvc_remote: str) -> None:
    project = [line.split()[0] for line in _dvc(repo, "remote", "list", "--project").splitlines() if line]
    if dvc_remote not in project:
        raise ValueError(
            f"DVC remote {dvc_remote!r} is not in the committed .dvc/config (remotes there: "
            f"{', '.join(project) or 'none'}); the workers clone the repository, so add it with "
            f"`dvc remote add {dvc_remote} <url>` (credentials: `--local` or the workers' environment) "
            "and commit"
        )


def select_cells(cells: Sequence[GridCell], only: Sequence[str] | None) -> list[GridCell]:
    """The cells named in `only` (all when None), in grid order; an unknown name is an error."""
    if not only:
        return list(cells)
    names = {c.name for c in cells}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ValueError(
            f"--only: {', '.join(unknown)} not in this grid; its cells: {', '.join(sorted(names))}"
        )
    return [c for c in cells if c.name in set(only)]


def read_status(path: Path) -> dict[str, dict[str, Any]]:
    """The per-cell records of `reports/cluster-status.json` (empty when there is none)."""
    try:
        return json.loads(path.read_text()).get("cells", {})
    except FileNotFoundError:
        return {}


def write_status(path: Path, results: Sequence[CellResult]) -> None:
    """Merge `results` into the status file (other cells' records are kept), atomically."""
    cells = read_status(path)
    cells.update({r.name: asdict(r) for r in results})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump({"cells": dict(sorted(cells.items()))}, out, indent=1)
    os.replace(tmp, path)


def _connect(address: str, node_ip_address: str | None) -> None:
    import ray

    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False}
    if node_ip_address:
        kwargs["_node_ip_address"] = node_ip_address  # a driver on a node with several addresses
    ray.init(**kwargs)


def run_grid(
    cells: Sequence[GridCell],
    *,
    address: str,
    git_remote: str,
    dvc_remote: str,
    repo: Path = Path("."),
    cpu: bool = False,
    cpus_per_cell: float = 1.0,
    max_retries: int = 3,
    work_dir: str | None = None,
    node_ip_address: str | None = None,
    status_path: Path | None = None,
    pull: bool = True,
) -> list[CellResult]:
    """Run `cells` on the Ray cluster at `address` (see the module docstring); returns one result per cell.

    Blocks until every cell has finished or failed, then pulls the finished experiments into `repo`.
    """
    import ray

    repo = repo.resolve()
    status_path = status_path or repo / CLUSTER_STATUS
    base = _base_commit(repo)
    git_url = _git_url(repo, git_remote)
    _check_dvc_remote(repo, dvc_remote)
    if cpus_per_cell <= 0 or max_retries < 0:
        raise ValueError(f"--cpus-per-cell {cpus_per_cell} / --max-retries {max_retries}: need > 0 and >= 0")

    done = finished_on_remote(git_url, base, cwd=repo)
    results = [CellResult.for_cell(c, "skipped", base) for c in cells if c.name in done]
    todo = [c for c in cells if c.name not in done]
    for result in results:
        log.info("%s: already on %s, skipped", result.name, git_url)
    known = read_status(status_path)
    fresh = [  # a success record of this base says more than "skipped": keep it
        r
        for r in results
        if (known.get(r.name) or {}).get("state") != "success" or known[r.name].get("base") != base
    ]
    write_status(status_path, fresh)
    if todo:
        _git(repo, "push", "--quiet", git_url, f"HEAD:{BASE_REF_PREFIX}{base}")
        log.info("base commit %s pushed to %s; %d cells to run", base[:12], git_url, len(todo))
        _connect(address, node_ip_address)
        try:
            results += _run_on_ray(
                todo, base, git_url, dvc_remote, cpu, cpus_per_cell, max_retries, work_dir, status_path
            )
        finally:
            ray.shutdown()
    finished = [r.name for r in results if r.state in ("success", "skipped")]
    if pull and finished:
        log.info("pulling %d experiments from %s", len(finished), git_url)
        _dvc(repo, "exp", "pull", "--remote", dvc_remote, git_url, *finished)
    order = {c.name: i for i, c in enumerate(cells)}
    return sorted(results, key=lambda r: order[r.name])


def _run_on_ray(
    cells: Sequence[GridCell],
    base: str,
    git_url: str,
    dvc_remote: str,
    cpu: bool,
    cpus_per_cell: float,
    max_retries: int,
    work_dir: str | None,
    status_path: Path,
) -> list[CellResult]:
    import ray

    resources = ray.cluster_resources()
    if not cpu and resources.get("GPU", 0) < 1:
        raise ValueError(
            f"the Ray cluster has no GPU (its resources: CPU {resources.get('CPU', 0):g}); "
            "pass --cpu to run the cells on CPUs"
        )
    task = ray.remote(run_cell)
    prepared = {}
    for dataset in sorted({c.dataset for c in cells}):
        spec = CellSpec(
            name=f"_prepare-{dataset}",
            command=["dvc", "exp", "run", "--pull", "-S", f"dataset={dataset}", PREPARE_STAGE],
            base=base,
            git_url=git_url,
            dvc_remote=dvc_remote,
            work_dir=work_dir,
            push=False,
        )
        prepared[dataset] = task.options(name=spec.name, num_cpus=1, max_retries=max_retries).remote(spec)
    pending = {}
    for cell in cells:
        spec = CellSpec(cell.name, worker_command(cell, cpu), base, git_url, dvc_remote, work_dir)
        options = {"name": cell.name, "num_cpus": cpus_per_cell, "num_gpus": 0 if cpu else 1}
        ref = task.options(max_retries=max_retries, **options).remote(spec, prepared[cell.dataset])
        pending[ref] = cell
    log.info("submitted %d cells (%s each)", len(cells), "CPU" if cpu else "1 GPU")
    results = []
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ref)
        try:
            record = ray.get(ref)
        except ray.exceptions.RayError as error:  # retries used up, or an unexpected exception
            crashed = isinstance(error, ray.exceptions.WorkerCrashedError)
            first = (str(error).strip().splitlines() or [""])[0]
            record = {
                "state": "failed",
                "error": f"{type(error).__name__}: {first}",
                "attempts": max_retries + 1 if crashed else None,
            }
        record.pop("name", None)
        result = CellResult.for_cell(cell, record.pop("state"), base, **record)
        results.append(result)
        write_status(status_path, [result])
        if result.state == "success":
            seconds = result.seconds or 0.0
            log.info(
                "%s: done on %s in %.0f s (attempt %s)", cell.name, result.node, seconds, result.attempts
            )
        else:
            log.error("%s: FAILED (attempt %s): %s", cell.name, result.attempts, result.error)
    for dataset, ref in prepared.items():  # done long ago (every cell waited for it); only to report it
        try:
            record = ray.get(ref)
        except ray.exceptions.RayError as error:
            record = {"state": "failed", "error": f"{type(error).__name__}"}
        if record["state"] == "success":
            where, seconds = record["node"], record["seconds"]
            log.info("%s of %s: computed once, on %s (%.0f s)", PREPARE_STAGE, dataset, where, seconds)
        else:  # not fatal: each cell then computes it itself, or fails with the reason
            log.warning("%s of %s could not be prepared: %s", PREPARE_STAGE, dataset, record.get("error"))
    return results


# --- the command -----------------------------------------------------------------------------------------


def _summary(results: Sequence[CellResult]) -> str:
    lines = [f"{'cell':<34} {'state':<8} {'attempts':>8} {'node':<16} {'seconds':>8}"]
    for r in results:
        seconds = "" if r.seconds is None else f"{r.seconds:.0f}"
        lines.append(
            f"{r.name:<34} {r.state:<8} {r.attempts or '':>8} {r.node or '':<16} {seconds:>8}"
            + (f"  {r.error}" if r.error else "")
        )
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biasdd-cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the grid's cells on a Ray cluster and pull the experiments")
    status = sub.add_parser("status", help="which cells are on the git remote, and the last run's failures")
    for p in (run, status):
        p.add_argument("--git-remote", required=True, help="git remote name or URL every node can reach")
        add_grid_options(p)
        p.add_argument("--only", nargs="+", metavar="CELL", help="only these cells of the grid (by name)")
        p.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: .)")
    run.add_argument("--address", required=True, help="the Ray cluster's head, HOST:PORT")
    run.add_argument("--dvc-remote", required=True, help="DVC remote (in the committed .dvc/config)")
    run.add_argument("--cpu", action="store_true", help="cells on CPUs (-S device=cpu), not one GPU each")
    run.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs a cell asks Ray for (default 1)")
    run.add_argument("--max-retries", type=int, default=3, help="retries of a cell whose worker died")
    run.add_argument("--work-dir", help="cells' clones on the nodes (default: <tmp>/biasdd-cluster)")
    run.add_argument("--node-ip-address", help="this machine's address in the cluster, if ambiguous")
    run.add_argument("--no-pull", action="store_true", help="do not `dvc exp pull` the experiments")
    run.add_argument("--dry-run", action="store_true", help="print each cell's command and state only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        cells = select_cells(
            grid_cells(
                args.datasets, args.ratios, args.severity_sweep, args.budget, args.extra, args.methods
            ),
            args.only,
        )
        repo = args.repo.resolve()
        git_url = _git_url(repo, args.git_remote)
        if args.command == "status" or args.dry_run:
            base = _git(repo, "rev-parse", "HEAD").strip()
            done = finished_on_remote(git_url, base, cwd=repo)
            records = read_status(repo / CLUSTER_STATUS)
            for cell in cells:  # the CLI's output: one line per cell
                if cell.name in done:
                    state = "done"
                elif records.get(cell.name, {}).get("state") == "failed":
                    state = "failed: " + str(records[cell.name].get("error"))
                else:
                    state = "to run"
                command = " ".join(worker_command(cell, getattr(args, "cpu", False)))
                print(f"{cell.name:<34} {state}" + (f"\n    {command}" if args.command == "run" else ""))
            return 0
        results = run_grid(
            cells,
            address=args.address,
            git_remote=args.git_remote,
            dvc_remote=args.dvc_remote,
            repo=repo,
            cpu=args.cpu,
            cpus_per_cell=args.cpus_per_cell,
            max_retries=args.max_retries,
            work_dir=args.work_dir,
            node_ip_address=args.node_ip_address,
            pull=not args.no_pull,
        )
    except (ValueError, RuntimeError) as error:
        log.error("%s", error)
        return 2
    print(_summary(results))
    print("next: biasdd-report   # Tables 1-2 from the pulled experiments; failed cells listed under them")
    return 1 if any(r.state == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
