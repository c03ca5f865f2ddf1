"""Queue the study's grid as DVC experiments, and start, watch or wait for the queue.

    biasdd-grid queue [--datasets cmnist ccifar10] [--ratios 0 0.1 0.5 0.8 0.95 1]
                      [--severity-sweep] [--budget quick] [--set KEY=VALUE ...] [--dry-run] [--start -j N]
    biasdd-grid wait                     # block until the queue has no queued or running experiment
    dvc queue start -j N                 # what `--start -j N` runs: N experiments at a time; on a GPU
                                         # machine N = its number of GPUs (each leases one)
    dvc queue status                     # queued / running / success / failed
    biasdd-report                        # Table 1, Table 2 and curves (biasdd.study.report)

Cost: queueing is ~1 s per experiment; each experiment is a whole `dvc repro` in its own temporary
copy of the repository (quick budget, 2-core CPU: about 6 min for CMNIST; `paper` needs a GPU for hours).
With `device: auto` each experiment's stages lease a GPU of their own, so `-j <number of GPUs>` runs one
experiment per card (more would wait for a free card). Beyond one machine: `biasdd-cluster` (Ray).

The grid (the study's layout):
- Table 1: every dataset x bias ratio at severity 4, the whole pipeline (DC, DSA, DM, the full set).
- Table 2 (`--severity-sweep`): DM only, at bias ratios 0 and 1 and severities 1-3 (severity 4 comes
  from Table 1's cells when its ratios include 0 and 1, else it is queued too). These experiments set
  `methods=[dm]`, so DM's stages and the full set run (the full set's numbers at each severity come
  with them) and the DC/DSA stages are not part of the run.
Each experiment gets a readable name, e.g. `cmnist-rho0.95-sev4-quick` or `cmnist-dm-rho0-sev2-quick`.
`--set KEY=VALUE` (repeatable) passes `-S KEY=VALUE` to every experiment, a variant of the whole grid
(e.g. `--set distill.repeats=3`: three distillations per method); the names end in it
(`cmnist-rho0.95-sev4-quick-distill.repeats-3`) and `biasdd-report` tables the variant on its own
(`reports/quick~distill.repeats=3/`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from biasdd.study.tools import run_tool, tool_command, tool_environment
from biasdd.vocab import BIAS_RATIOS, BUDGETS, DATASETS, METHODS, SEVERITIES, SWEEP_RATIOS, TABLE1_SEVERITY

log = logging.getLogger(__name__)

SWEEP_METHODS = ("dm",)
GRID_KEYS = ("dataset", "bias_ratio", "severity", "budget", "methods")  # set per cell by the grid


@dataclass(frozen=True)
class GridCell:
    """One experiment to queue: a whole-pipeline run at one grid point."""

    dataset: str
    bias_ratio: float
    severity: int
    budget: str
    methods: tuple[str, ...] | None = None  # None = params.yaml's list (all methods)
    extra: tuple[str, ...] = ()  # further `-S KEY=VALUE` overrides (`--set`), the same for every cell

    @property
    def name(self) -> str:
        only = "".join(f"-{m}" for m in self.methods) if self.methods else ""
        suffix = "".join("-" + re.sub(r"[^A-Za-z0-9._]+", "-", e.replace("=", "-")) for e in self.extra)
        return f"{self.dataset}{only}-rho{self.bias_ratio:g}-sev{self.severity}-{self.budget}{suffix}"

    def overrides(self) -> list[str]:
        """The `-S` values of this cell (Hydra overrides of conf/)."""
        values = [
            ("dataset", self.dataset),
            ("bias_ratio", f"{self.bias_ratio:g}"),
            ("severity", str(self.severity)),
            ("budget", self.budget),
        ]
        if self.methods:
            values.append(("methods", "[" + ",".join(self.methods) + "]"))
        return [f"{key}={value}" for key, value in values] + list(self.extra)

    def command(self) -> list[str]:
        cmd = ["dvc", "exp", "run", "--queue", "-n", self.name]
        for override in self.overrides():
            cmd += ["-S", override]
        return cmd


def grid_cells(
    datasets: Sequence[str] = DATASETS,
    ratios: Sequence[float] = BIAS_RATIOS,
    severity_sweep: bool = False,
    budget: str = "quick",
    extra: Sequence[str] = (),
    methods: Sequence[str] | None = None,
) -> list[GridCell]:
    """Table 1's cells (`methods`: their methods; None = params.yaml's), then (with `severity_sweep`) Table
    2's DM-only cells not already covered; every cell with the `extra` overrides (KEY=VALUE, not one of the
    grid's own keys)."""
    for method in methods or ():
        if method not in METHODS:
            raise ValueError(f"--methods {method!r}: valid are {', '.join(METHODS)}")
    for dataset in datasets:
        if dataset not in DATASETS:
            raise ValueError(f"dataset {dataset!r}: valid are {', '.join(DATASETS)}")
    for ratio in ratios:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"bias ratio {ratio}: valid are values in [0, 1]")
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r}: valid are {', '.join(BUDGETS)}")
    for override in extra:
        key, eq, value = override.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"--set {override!r}: valid is KEY=VALUE, as `dvc exp run -S` takes it")
        if key.lstrip("+~") in GRID_KEYS:
            raise ValueError(
                f"--set {override!r}: the grid sets {', '.join(GRID_KEYS)} itself (--datasets, --ratios, "
                "--budget, --methods, --severity-sweep); valid are the other params.yaml keys"
            )
    extra = tuple(extra)
    chosen = tuple(methods) if methods else None
    cells = [GridCell(d, float(r), TABLE1_SEVERITY, budget, chosen, extra) for d in datasets for r in ratios]
    if severity_sweep:
        for dataset in datasets:
            for ratio in SWEEP_RATIOS:
                for severity in SEVERITIES:
                    if severity == TABLE1_SEVERITY and ratio in ratios:
                        continue  # Table 1's full-pipeline experiment already gives this DM cell
                    cells.append(GridCell(dataset, ratio, severity, budget, SWEEP_METHODS, extra))
    return cells


def queue(cells: Sequence[GridCell], repo: Path, dry_run: bool = False) -> int:
    """Queue each cell with `dvc exp run --queue`; returns the number that failed to queue."""
    failed = 0
    for cell in cells:
        cmd = cell.command()
        if dry_run:
            print(shlex.join(cmd))  # the CLI's dry-run output is the commands themselves
            continue
        result = run_tool(cmd, repo)
        if result.returncode != 0:
            failed += 1
            log.error("could not queue %s:\n%s", cell.name, (result.stderr or result.stdout).strip())
        else:
            log.info("queued %s", cell.name)
    return failed


def start_command(jobs: int) -> list[str]:
    """The command that starts the queue's workers, `jobs` experiments at a time."""
    return ["dvc", "queue", "start", "-j", str(jobs)]


def start_queue(repo: Path, jobs: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dvc queue start -j <jobs>`; returns as soon as dvc does, with its output.

    The queue's workers are daemons that inherit dvc's stdout and stderr: read through pipes, the output
    would only end when the last worker exits (after the whole queue has run). A file has no end to wait
    for, so the output goes to one and is read back when dvc itself exits.
    """
    cmd = tool_command(start_command(jobs))
    with tempfile.TemporaryFile("w+") as out:
        result = subprocess.run(
            cmd,
            cwd=repo,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            env=env or tool_environment(),
        )
        out.seek(0)
        return subprocess.CompletedProcess(cmd, result.returncode, out.read(), "")


def queue_counts(repo: Path) -> dict[str, int]:
    """Experiments per queue state (Queued, Running, Success, Failed, ...) from `dvc queue status`."""
    result = run_tool(["dvc", "queue", "status"], repo)
    if result.returncode != 0:
        raise RuntimeError(f"dvc queue status failed:\n{result.stderr}")
    counts: dict[str, int] = {}
    for line in result.stdout.splitlines()[1:]:  # header: Task Name Created Status
        words = line.split()
        if not words or line.startswith("Worker status"):
            break
        for state in ("Queued", "Running", "Success", "Failed"):
            if state in words:
                counts[state] = counts.get(state, 0) + 1
    return counts


def wait(repo: Path, poll_s: float = 10.0, timeout_s: float | None = None) -> dict[str, int]:
    """Block until nothing is queued or running; returns the final counts."""
    start = time.monotonic()
    while True:
        counts = queue_counts(repo)
        if not counts.get("Queued") and not counts.get("Running"):
            return counts
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"queue still busy after {timeout_s:.0f} s: {json.dumps(counts)}")
        log.info("queue: %s", counts)
        time.sleep(poll_s)


def _next_steps(jobs: int) -> str:
    return (
        "next:\n"
        f"  dvc queue start -j {jobs}    # {jobs} experiment(s) at a time; with GPUs: -j <number of GPUs>\n"
        "  dvc queue status            # queued / running / success / failed\n"
        "  dvc queue logs <name>       # one experiment's output\n"
        "  biasdd-report               # Table 1, Table 2, curves -> reports/<budget>/"
    )


def add_grid_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose a grid's cells: shared by `biasdd-grid queue` and `biasdd-cluster`."""
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(BIAS_RATIOS), help="bias ratios")
    parser.add_argument("--severity-sweep", action="store_true", help="also Table 2's DM severity sweep")
    parser.add_argument("--budget", default="quick", choices=BUDGETS)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="Table 1's methods (default: params.yaml's `methods`)"
    )
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pass `-S KEY=VALUE` to every experiment (repeatable), e.g. --set debias.mode=groups",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biasdd-grid", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the grid as DVC experiments")
    add_grid_options(q)
    q.add_argument("--dry-run", action="store_true", help="print the commands, queue nothing")
    q.add_argument("--start", action="store_true", help="then run `dvc queue start -j N`")
    q.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="parallel experiments for --start (default 1); on a GPU machine, its number of GPUs",
    )
    w = sub.add_parser("wait", help="wait until no experiment is queued or running")
    w.add_argument("--poll", type=float, default=10.0, help="seconds between `dvc queue status` calls")
    w.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    for p in (q, w):
        p.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: .)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "wait":
        try:
            counts = wait(args.repo, poll_s=args.poll, timeout_s=args.timeout)
        except (RuntimeError, TimeoutError) as error:  # not a DVC repository, or --timeout passed
            log.error("%s", " ".join(str(error).split()))
            return 2
        print(json.dumps(counts))
        return 1 if counts.get("Failed") else 0

    try:
        cells = grid_cells(
            args.datasets, args.ratios, args.severity_sweep, args.budget, args.extra, args.methods
        )
    except ValueError as error:
        parser.error(str(error))  # one line and exit status 2, before anything is queued
    failed = queue(cells, args.repo, dry_run=args.dry_run)
    if args.dry_run:
        if args.start:
            print(shlex.join(start_command(args.jobs)))
        return 0
    log.info("queued %d of %d experiments", len(cells) - failed, len(cells))
    if failed == len(cells):
        return 1  # nothing to start (each failure was logged with dvc's message)
    if args.start:
        result = start_queue(args.repo, args.jobs)
        if result.returncode != 0:
            log.error("%s failed:\n%s", shlex.join(start_command(args.jobs)), result.stdout)
            return 1
        log.info("%s", result.stdout.strip())
        print("started; watch with `dvc queue status`, then `biasdd-report`")
    else:
        print(_next_steps(args.jobs))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
