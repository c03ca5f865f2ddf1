"""The study's tables and curves from DVC experiments: Table 1, Table 2 and accuracy-vs-bias-ratio curves.

    biasdd-report [--out reports] [--repo .] [--all-commits]    # or: python -m biasdd.report
    # ~2 s for a handful of experiments: one `dvc exp show --json`, then pure Python and matplotlib

Every row of `dvc exp show --json` (the workspace, the baseline commit and each experiment; queued,
running or failed ones have no metrics yet and are skipped) contributes the metrics files
`metrics/<split>/<name>.json` (name = full, dc, dsa, dm) it declares. A cell's position in the study's
grid is (budget, dataset, bias ratio, severity, method, split), the point read from the row's params (the
values DVC composed for that run). Its settings are the rest of the params its numbers depend on: those
dvc.yaml feeds the stages upstream of its metrics file, less NEUTRAL (`relevant`). Rows of other settings
never share a cell: each budget's tables are made for its reference settings (those of its first baseline
row: the workspace, HEAD, older commits; for a budget only experiments ran, the newest one's), and every
other set of settings a run used gets tables of its own, `<budget>~<changed params>` (e.g.
`quick~distill.repeats=3` for `dvc exp run -S distill.repeats=3`), in which the cells that do not depend
on the change (there: the full set) are the reference's. When two rows of the same settings fill a cell
the newest wins (the workspace counts as newest) and a log line says so. The workspace's metrics are left
out when `dvc status` says a stage is out of date: its params.yaml then names a point its metrics files
were not made from (params edited, or `dvc exp run` results not applied), so they would fill the cell
with stale numbers. A commit's metrics files are left out on the same grounds when its dvc.lock records
their stages (or one upstream) with other param values than its params.yaml (`stale_metrics`).

Outputs, one folder per budget and settings found, `<out>/<budget>/` and `<out>/<budget>~<changes>/`:

- `table1_<split>.md` / `.csv`: rows DC, DSA, DM, Full set; columns dataset x bias ratio
  (0, 0.1, 0.5, 0.8, 0.95, 1.0) at severity 4; cells top-1 accuracy in %, mean +- std over the repeats.
  `split` is `test_conflicting` (rho = 0: the study's number) or `test_uniform` (rho = 0.1).
- `table2_<split>.md` / `.csv`: DM at bias ratios 0 and 1.0 (rows, per dataset) x severities 1-4.
- `curves_<dataset>.png`: accuracy vs bias ratio per method with error bars (std), the full set too,
  at severity 4, one panel per test split.
- `findings_cmnist.md`: the four findings of docs/protocol.md §8 a CMNIST-DD Table 1 shows (the full set
  high at rho 0.95, every method within 10 points of it at rho 0.1, DM below DC and DSA at rho 0.95,
  every model at most 5 points above chance at rho 1.0), each reproduced or not, by how much, and
  whether that margin is smaller than the spread of the cells it rests on.
- `cells.csv`: every cell found, long form, with the experiment it came from.
- `settings.json`: the settings the folder's cells were made with, and how they differ from the reference.

Missing cells stay blank: a partial grid gives partial tables. Each table's title states its budget
and, in a variant's folder, the changed settings.
Cells that failed on a Ray cluster (`biasdd-cluster run` records them in `reports/cluster-status.json`
of the repository; they have no experiment, hence no metrics) are listed under the tables they belong to.
Deviation from STYLE ("only the plotting module imports matplotlib"): the curves live here, next to
the tables they mirror; `biasdd.plots` is reused for the backend set-up and the atomic PNG writer.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io as _io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from biasdd.bias import NUM_CLASSES
from biasdd.config import section
from biasdd.errors import UnknownKeyError

log = logging.getLogger(__name__)

METHODS = ("dc", "dsa", "dm")
ROW_NAMES = {"dc": "DC", "dsa": "DSA", "dm": "DM", "full": "Full set"}
DATASETS = ("cmnist", "ccifar10")
DATASET_NAMES = {"cmnist": "CMNIST-DD", "ccifar10": "CCIFAR10-DD"}
BIAS_RATIOS = (0.0, 0.1, 0.5, 0.8, 0.95, 1.0)  # the study's Table 1 grid
TABLE1_SEVERITY = 4
TABLE2_RATIOS = (0.0, 1.0)
SEVERITIES = (1, 2, 3, 4)
SPLITS = ("test_conflicting", "test_uniform")
SPLIT_TITLES = {
    "test_conflicting": "unbiased test set (rho = 0, the study's number)",
    "test_uniform": "uniform test set (rho = 0.1)",
}
BUDGET_NOTES = {
    "quick": "REDUCED budget, not the study's numbers",
    "hour": "REDUCED budget (an hour on a CPU), not the study's numbers",
    "paper": "the study's budget (docs/protocol.md)",
}
WORKSPACE = "workspace"
CLUSTER_STATUS = Path("reports") / "cluster-status.json"  # written by biasdd.cluster, relative to the repo


Settings = tuple[tuple[str, str], ...]  # sorted (dotted param key, JSON value)


@dataclass(frozen=True)
class Cell:
    """One method's accuracy on one split for one grid point, and where it came from."""

    budget: str
    dataset: str
    bias_ratio: float
    severity: int
    method: str  # full, dc, dsa, dm
    split: str
    mean: float  # fraction in [0, 1]
    std: float
    n_repeats: int | None
    source: str  # experiment name or rev
    timestamp: datetime | None  # None = the workspace, counted as newest
    settings: Settings = ()  # what else its numbers depend on (`cell_settings`)

    @property
    def position(self) -> tuple[str, str, float, int, str, str]:
        """Where it goes in a budget's tables."""
        return (self.budget, self.dataset, self.bias_ratio, self.severity, self.method, self.split)

    @property
    def key(self) -> tuple:
        """One cell per position and settings: runs of other settings never share a cell."""
        return (*self.position, self.settings)


# --- settings: what a cell's numbers depend on besides its grid point ----------------------------------

AXES = ("budget", "dataset", "bias_ratio", "severity")  # the grid point, a cell's position
# Params that change no reported number: where a run computes or stores (device, download.mirror,
# download.cache_dir), which methods ran (each method's cells are its own), checkpoints, the test batch,
# `compute.compile` (compiled == eager up to round-off), the plots, the bias classifier (it scores bias,
# not accuracy), and debias / bias_model (a debiased run is skipped; with debias.mode none nothing reads
# them). Every other param of a stage upstream of a metrics file (dvc.yaml) counts: tests/test_report.py
# checks that a cell's settings are exactly those (`relevant`).
NEUTRAL = (
    "device",
    "methods",
    "download.mirror",
    "download.cache_dir",
    "distill.checkpoint_every",
    "evaluate.batch_test",
    "compute.compile",
    "plot",
    "bias_classifier",
    "bias_model",
    "debias",
)
UNSET = "unset"  # a param one run has and another lacks (older commits)
QUOTE = '"'


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if value is None:  # null is a param's default, as its absence is (a key newer than a run's commit)
            continue
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = json.dumps(value, sort_keys=True)
    return flat


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def run_settings(params: Mapping[str, Any]) -> dict[str, str]:
    """A run's params, flattened to dotted keys, less its grid point and the NEUTRAL ones."""
    return {k: v for k, v in _flatten(params).items() if not _under(k, (*AXES, *NEUTRAL))}


def relevant(settings: Mapping[str, str], method: str, dataset: str) -> dict[str, str]:
    """The part of a run's settings that one cell (a method's or the full set's, on `dataset`) depends on:
    dvc.yaml's params of the stages upstream of its metrics file. A method's cell: not the other methods'
    distillation and schedules, not the full set's training; the full set's: no distillation, no
    synthetic-set evaluation, no DSA augmentation."""
    other_datasets = [d for d in (*DATASETS, *_schedule_datasets(settings)) if d != dataset]
    drop = [f"evaluate.synthetic.schedule.{d}" for d in other_datasets]
    if dataset != "cmnist":
        drop.append("cmnist")
    if method == "full":
        drop += ["distill", "evaluate.synthetic", "augment"]
    else:
        drop.append("evaluate.full")
        drop += [f"distill.{m}" for m in METHODS if m != method]
        drop += [f"evaluate.synthetic.schedule.{dataset}.{m}" for m in METHODS if m != method]
    return {k: v for k, v in settings.items() if not _under(k, drop)}


def _schedule_datasets(settings: Mapping[str, str]) -> set[str]:
    prefix = "evaluate.synthetic.schedule."
    return {k[len(prefix) :].split(".")[0] for k in settings if k.startswith(prefix)}


def cell_settings(settings: Mapping[str, str], method: str, dataset: str) -> Settings:
    return tuple(sorted(relevant(settings, method, dataset).items()))


# --- reading `dvc exp show --json` -----------------------------------------------------------------


def dvc_executable() -> str:
    """`dvc` from this interpreter's environment when it is there (an un-activated venv), else PATH's."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def tool_command(command: Sequence[str]) -> list[str]:
    """`command` with a leading `dvc` replaced by `dvc_executable()` (other commands as they are)."""
    return [dvc_executable(), *command[1:]] if command and command[0] == "dvc" else list(command)


def tool_environment() -> dict[str, str]:
    """The environment for `dvc` subprocesses: this interpreter's bin folder first on PATH, because
    DVC starts its queue workers as `dvc` from PATH and the stages call `python`; from an un-activated
    venv they would otherwise find another installation, or none (the worker then never starts)."""
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}"}


def run_tool(cmd: Sequence[str], repo: Path) -> subprocess.CompletedProcess:
    """`cmd` in `repo` with this environment's tools (`tool_command`, `tool_environment`), output captured."""
    return subprocess.run(
        tool_command(cmd), cwd=repo, capture_output=True, text=True, check=False, env=tool_environment()
    )


def exp_show_json(repo: Path, all_commits: bool = False) -> list[dict[str, Any]]:
    """Run `dvc exp show --json` in `repo` (the workspace, HEAD and its experiments); the workspace row
    only when `dvc status` finds it up to date (see the module's docstring)."""
    cmd = ["dvc", "exp", "show", "--json"]
    if all_commits:
        cmd.append("--all-commits")
    result = run_tool(cmd, repo)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {repo}:\n{result.stderr}")
    rows = without_stale_commit_metrics(json.loads(result.stdout), repo)
    if workspace_is_current(repo):
        return rows
    log.info("workspace: not reported (`dvc status`: out of date; metrics may not match params)")
    return without_workspace(rows)


def workspace_is_current(repo: Path) -> bool:
    """Does `dvc status` in `repo` find every stage up to date (so the workspace's metrics belong to its
    params)? True when the status cannot be read (the report then keeps the workspace, and says so)."""
    result = run_tool(["dvc", "status", "--json"], repo)
    try:
        changed = json.loads(result.stdout) if result.returncode == 0 else None
    except json.JSONDecodeError:
        changed = None
    if changed is None:
        log.warning("`dvc status` failed in %s; the workspace's metrics are reported as they are", repo)
        return True
    return not changed


def without_workspace(exp_show: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`exp_show` with its workspace row's metrics dropped; its params stay, since they name the settings
    the repository is at (`reference_settings`). Experiments hang under the baseline rows and stay."""
    return [_with_metrics(row, {}) if row.get("rev") == WORKSPACE else row for row in exp_show]


def _with_metrics(row: Mapping[str, Any], metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    """A copy of `row` whose metrics are `metrics` (the row itself is left as it is)."""
    return {**row, "data": {**(row.get("data") or {}), "metrics": metrics}}


# --- commits whose metrics are not their params' ---------------------------------------------------------

_MISSING = object()


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    """`params` at a dotted key as dvc.lock writes it; _MISSING when the key is not there."""
    try:
        return section(params, *dotted.split("."))
    except UnknownKeyError:
        return _MISSING


def _git_yaml(repo: Path, rev: str, path: str) -> Any:
    try:
        result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
        return yaml.safe_load(result.stdout) if result.returncode == 0 else None
    except (OSError, yaml.YAMLError):  # no git (a `dvc init --no-scm` repository), or a broken file
        return None


def _stage_names(dvc_yaml: Mapping[str, Any], params: Mapping[str, Any]) -> set[str] | None:
    """The stage names a commit's dvc.yaml defines (`foreach` resolved); None when it cannot tell."""
    names = set()
    for name, definition in (dvc_yaml.get("stages") or {}).items():
        if "foreach" not in definition:
            names.add(name)
            continue
        items = definition["foreach"]
        if isinstance(items, str) and items.startswith("${") and items.endswith("}"):
            items = _lookup(params, items[2:-1])
        if not isinstance(items, list | Mapping):
            return None
        names |= {f"{name}@{item}" for item in items}
    return names


def stale_metrics(lock: Mapping[str, Any], dvc_yaml: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """{metrics file: [param, ...]} for each metrics file of a commit that its `dvc.lock` says was made
    with other values of those params (in its own stage or one upstream) than the commit's params.yaml
    holds: params edited and committed without `dvc repro`. What `dvc status` would say at that commit,
    for params only (code changes are not part of a cell's settings either)."""
    names = _stage_names(dvc_yaml, params)
    if names is None:
        return {}
    stages = {n: s for n, s in (lock.get("stages") or {}).items() if n in names}  # stale lock entries out
    made_by = {out["path"]: n for n, s in stages.items() for out in s.get("outs") or []}

    def differing(stage: str, seen: set[str]) -> set[str]:
        if stage in seen:
            return set()
        seen.add(stage)
        recorded = (stages[stage].get("params") or {}).get("params.yaml") or {}
        keys = {k for k, v in recorded.items() if _lookup(params, k) != v}
        for dep in stages[stage].get("deps") or []:
            if dep["path"] in made_by:
                keys |= differing(made_by[dep["path"]], seen)
        return keys

    found = {}
    for path, stage in made_by.items():
        if _metric_path(path) is not None:
            keys = differing(stage, set())
            if keys:
                found[path] = sorted(keys)
    return found


def without_stale_commit_metrics(
    exp_show: Sequence[Mapping[str, Any]], repo: Path
) -> list[Mapping[str, Any]]:
    """`exp_show` with each commit row's stale metrics (`stale_metrics`) dropped: its metrics files then
    hold the numbers of other params than the row names. Experiments are DVC's own runs and stay."""
    rows, dropped = [], []
    for row in exp_show:
        rev, metrics = str(row.get("rev", "")), (row.get("data") or {}).get("metrics") or {}
        lock = _git_yaml(repo, rev, "dvc.lock") if rev != WORKSPACE and metrics else None
        dvc_yaml = _git_yaml(repo, rev, "dvc.yaml") if lock else None
        try:
            readable = isinstance(lock, Mapping) and isinstance(dvc_yaml, Mapping)
            stale = stale_metrics(lock, dvc_yaml, _row_params(row)) if readable else {}
        except (KeyError, TypeError, AttributeError):  # a dvc.yaml or dvc.lock layout it does not know
            stale = {}
        if stale:
            row = _with_metrics(row, {path: value for path, value in metrics.items() if path not in stale})
            keys = sorted({k for ks in stale.values() for k in ks})
            dropped.append(rev[:7])
            log.debug(
                "commit %s: %s made with other values of %s; not reported", rev[:7], sorted(stale), keys
            )
        rows.append(row)
    if dropped:
        log.info(
            "%d commit(s) hold metrics made with other params than their params.yaml (committed without "
            "`dvc repro`), not reported: %s",
            len(dropped),
            ", ".join(dropped),
        )
    return rows


def iter_rows(exp_show: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every row with data: baselines (workspace, commits) and, nested under them, their experiments.

    DVC 3 nests experiments as `experiments: [{"revs": [row, ...], "executor": ..., "name": ...}]`; the
    executor is null for a finished experiment, else its state: queued, running (its metrics files may
    still be the baseline's) or failed. Only finished experiments count.
    """
    for row in exp_show:
        yield row
        for exp_range in row.get("experiments") or []:
            state = (exp_range.get("executor") or {}).get("state", "success")
            if state != "success":
                log.info("experiment %s is %s: not reported", exp_range.get("name"), state)
                continue
            yield from iter_rows(exp_range.get("revs") or [])


def _file_data(results: Mapping[str, Any] | None, path: str) -> Mapping[str, Any] | None:
    entry = (results or {}).get(path) or {}
    return entry.get("data")


def _timestamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _metric_path(path: str) -> tuple[str, str] | None:
    """(split, name) of a DVC metrics file `metrics/<split>/<name>.json`, else None."""
    parts = Path(path).parts
    if len(parts) != 3 or parts[0] != "metrics" or parts[1] not in SPLITS or not parts[2].endswith(".json"):
        return None
    name = Path(parts[2]).stem
    return (parts[1], name) if name in ROW_NAMES else None


def cells_from_row(row: Mapping[str, Any]) -> list[Cell]:
    """The cells one row fills; empty when it has no metrics (queued, running, failed).

    A row's grid point (budget, dataset, bias ratio, severity) comes from its params, which DVC
    composed for that run; its metrics are the files `metrics/<split>/<name>.json` that the row's
    pipeline declares (DVC reports only those: with `methods: [dm]` the DC/DSA files are not part of the
    run, and do not show). Use whole-pipeline experiments for the report: a run that reproduces only
    some stages (`dvc exp run evaluate@dm`) leaves the others' metrics from its baseline.
    """
    data = row.get("data") or {}
    metrics = data.get("metrics") or {}
    params = _row_params(row)
    source = row.get("name") or row.get("rev") or "?"
    if source != WORKSPACE and row.get("rev") and row.get("name"):
        source = f"{row['name']} ({row['rev'][:7]})"
    timestamp = _timestamp(data.get("timestamp"))
    debias = (params.get("debias") or {}).get("mode", "none")
    if debias != "none":  # the study's tables are plain DC/DSA/DM: a debiased run is another method
        log.info("%s: skipped (debias.mode=%s; Tables 1-2 report the study's methods)", source, debias)
        return []
    point = {key: params.get(key) for key in ("budget", "dataset", "bias_ratio", "severity")}
    if any(value is None for value in point.values()):
        if metrics:
            log.warning("%s: params lack %s; skipped", source, [k for k, v in point.items() if v is None])
        return []
    evaluate = params.get("evaluate") or {}
    settings = run_settings(params)
    cells = []
    for path in sorted(metrics):
        found = _metric_path(path)
        values = _file_data(metrics, path)
        if found is None or not values:
            continue
        split, name = found
        mean, std = _num(values.get("acc")), _num(values.get("acc_sd"))
        repeats = (evaluate.get("full" if name == "full" else "synthetic") or {}).get("repeats")
        if mean is None:
            continue
        cells.append(
            Cell(
                budget=str(point["budget"]),
                dataset=str(point["dataset"]),
                bias_ratio=float(point["bias_ratio"]),
                severity=int(point["severity"]),
                method=name,
                split=split,
                mean=mean,
                std=0.0 if std is None else std,
                n_repeats=repeats,
                source=source,
                timestamp=timestamp,
                settings=cell_settings(settings, name, str(point["dataset"])),
            )
        )
    return cells


def _newer(a: Cell, b: Cell) -> bool:
    """Is `a` newer than `b`? The workspace (no timestamp) is the newest of all."""
    if a.timestamp is None or b.timestamp is None:
        return a.timestamp is None and b.timestamp is not None
    return a.timestamp > b.timestamp


RowCells = list[tuple[Mapping[str, Any], list[Cell]]]  # each row with data and the cells it fills


def rows_with_cells(exp_show: Iterable[Mapping[str, Any]]) -> RowCells:
    return [(row, cells_from_row(row)) for row in iter_rows(exp_show)]


def collect_cells(exp_show: Iterable[Mapping[str, Any]], rows: RowCells | None = None) -> dict[tuple, Cell]:
    """One cell per (budget, dataset, bias ratio, severity, method, split) and settings: the newest wins.
    `rows`: `rows_with_cells(exp_show)` when the caller has it already.

    Each overridden cell is logged at DEBUG (`biasdd-report --verbose`); one INFO line counts those whose
    values differed, since a repository's history (`--all-commits`) holds hundreds of them."""
    cells: dict[tuple, Cell] = {}
    differed: list[str] = []
    for _, row_cells in rows_with_cells(exp_show) if rows is None else rows:
        for cell in row_cells:
            old = cells.get(cell.key)
            if old is None:
                cells[cell.key] = cell
                continue
            winner, loser = (cell, old) if _newer(cell, old) else (old, cell)
            cells[cell.key] = winner
            same = (winner.mean, winner.std) == (loser.mean, loser.std)
            key = "/".join(str(k) for k in cell.position)
            if not same:
                differed.append(key)
            log.debug(
                "cell %s filled by %s and %s%s; taking the newest, %s",
                key,
                winner.source,
                loser.source,
                " (same values)" if same else "",
                winner.source,
            )
    if differed:
        log.info(
            "%d cell(s) filled by more than one run with different values (e.g. %s); the newest run's "
            "values kept in each (--verbose lists them)",
            len(differed),
            differed[0],
        )
    return cells


# --- variants: one set of tables per set of settings ----------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """The settings one folder of tables is made for: a budget's reference settings with `changes`."""

    budget: str
    settings: Settings  # the whole run settings (`run_settings`), sorted
    changes: Settings = ()  # against the budget's reference; () = the reference itself
    found_in: str = ""  # the row the settings were read from

    @property
    def folder(self) -> str:
        """`<budget>` for the reference, else `<budget>~<key>=<value>[+...]` (or a short hash)."""
        if not self.changes:
            return self.budget
        slug = "+".join(f"{k}={_plain(v).strip(QUOTE)}" for k, v in self.changes)  # strings unquoted
        if len(slug) > 60 or not all(ch.isalnum() or ch in "._=+-" for ch in slug):
            slug = "v" + hashlib.sha1(json.dumps(self.changes).encode()).hexdigest()[:8]
        return f"{self.budget}~{slug}"

    def note(self) -> str:
        """For the titles: how these settings differ from the reference's."""
        if not self.changes:
            return ""
        shown = ", ".join(f"{k}={_plain(v)}" for k, v in self.changes[:4])
        more = f" and {len(self.changes) - 4} more (settings.json)" if len(self.changes) > 4 else ""
        return f"; settings changed from {self.budget}/'s: {shown}{more}"

    def fits(self, cell: Cell) -> bool:
        return cell.budget == self.budget and cell.settings == cell_settings(
            dict(self.settings), cell.method, cell.dataset
        )


def _plain(value: str) -> str:
    return value if value == UNSET else json.dumps(json.loads(value), separators=(",", ":"))


def _row_params(row: Mapping[str, Any]) -> Mapping[str, Any]:
    return _file_data((row.get("data") or {}).get("params"), "params.yaml") or {}


def reference_settings(exp_show: Sequence[Mapping[str, Any]], rows: RowCells) -> dict[str, Variant]:
    """Each budget's reference settings: those of the first baseline row of that budget (the workspace,
    then HEAD, then, with --all-commits, older commits), so the repository's own settings; for a budget
    that only experiments ran, the newest experiment's."""
    refs: dict[str, Variant] = {}
    for row in exp_show:
        budget = _row_params(row).get("budget")
        if budget is not None and str(budget) not in refs:
            settings = tuple(sorted(run_settings(_row_params(row)).items()))
            refs[str(budget)] = Variant(str(budget), settings, found_in=str(row.get("rev", "?"))[:9])
    newest: dict[str, tuple[datetime, Mapping[str, Any]]] = {}
    for row, _ in rows:
        budget, stamp = _row_params(row).get("budget"), _timestamp((row.get("data") or {}).get("timestamp"))
        if budget is None or str(budget) in refs or stamp is None:
            continue
        if str(budget) not in newest or stamp > newest[str(budget)][0]:
            newest[str(budget)] = (stamp, row)
    for budget, (_, row) in newest.items():
        settings = tuple(sorted(run_settings(_row_params(row)).items()))
        refs[budget] = Variant(budget, settings, found_in=str(row.get("name") or row.get("rev", "?")))
    return refs


def find_variants(exp_show: Sequence[Mapping[str, Any]], rows: RowCells | None = None) -> list[Variant]:
    """The reference of every budget, and one variant per other set of settings a row's cells were made
    with: the reference with the row's params that differ and that those cells depend on (a run that
    changed only DC's learning rate makes a variant whose DSA, DM and full-set cells are the reference's).
    """
    rows = rows_with_cells(exp_show) if rows is None else rows
    refs = reference_settings(exp_show, rows)
    variants = {(v.budget, ()): v for v in refs.values()}
    for row, row_cells in rows:
        misfits = [c for c in row_cells if c.budget in refs and not refs[c.budget].fits(c)]
        if not misfits:
            continue
        ref = refs[misfits[0].budget]
        ours, theirs = run_settings(_row_params(row)), dict(ref.settings)
        keys: set[str] = set()
        for c in misfits:  # the params these cells depend on, in this run's settings or the reference's
            keys |= relevant(ours, c.method, c.dataset).keys() | relevant(theirs, c.method, c.dataset).keys()
        changed = [k for k in keys if ours.get(k, UNSET) != theirs.get(k, UNSET)]
        changes = tuple(sorted((k, ours.get(k, UNSET)) for k in changed))
        if (ref.budget, changes) in variants:
            continue
        merged = {**theirs, **dict(changes)}
        merged = {k: v for k, v in merged.items() if v != UNSET}
        variants[(ref.budget, changes)] = Variant(
            ref.budget, tuple(sorted(merged.items())), changes, found_in=misfits[0].source
        )
    return sorted(variants.values(), key=lambda v: (v.budget, bool(v.changes), v.folder))


def variant_cells(cells: Mapping[tuple, Cell], variant: Variant) -> dict[tuple, Cell]:
    """The cells of `variant`'s tables, keyed by position (one each: `cells` has one per settings)."""
    return {c.position: c for c in cells.values() if variant.fits(c)}


# --- tables ------------------------------------------------------------------------------------------


SPREAD = "mean ± std over the evaluation networks, (n=1) where one network was trained"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:g}"


def _fmt_cell(cell: Cell | None, plus_minus: str) -> str:
    if cell is None:
        return ""
    if cell.n_repeats == 1:  # one network: no spread to show
        return f"{100 * cell.mean:.2f} (n=1)"
    return f"{100 * cell.mean:.2f} {plus_minus} {100 * cell.std:.2f}"


@dataclass(frozen=True)
class Table:
    """A titled grid: row labels x column labels -> cell (None = blank)."""

    name: str  # file stem, e.g. table1_test_conflicting
    title: str
    corner: str  # the label of the row-label column
    columns: list[str]
    rows: list[tuple[str, list[Cell | None]]]
    notes: tuple[str, ...] = ()  # lines under the table (markdown only), e.g. failed cells

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", f"| {self.corner} | " + " | ".join(self.columns) + " |"]
        lines.append("|---" * (len(self.columns) + 1) + "|")
        for label, cells in self.rows:
            lines.append(f"| {label} | " + " | ".join(_fmt_cell(c, "±") for c in cells) + " |")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([self.corner, *self.columns])
        for label, cells in self.rows:
            writer.writerow([label, *(_fmt_cell(c, "+-") for c in cells)])
        return buffer.getvalue()


def _budget_title(budget: str, variant: str = "") -> str:
    note = BUDGET_NOTES.get(budget)
    return f"budget: {budget}" + (f" ({note})" if note else "") + variant


def _ratios(cells: Mapping[tuple, Cell], budget: str, dataset: str) -> list[float]:
    """The study's ratios, plus any other ratio an experiment ran (so nothing is silently dropped)."""
    extra = {c.bias_ratio for c in cells.values() if c.budget == budget and c.dataset == dataset}
    return sorted(set(BIAS_RATIOS) | extra)


def _datasets(cells: Mapping[tuple, Cell], budget: str) -> list[str]:
    found = {c.dataset for c in cells.values() if c.budget == budget}
    return [*DATASETS, *sorted(found - set(DATASETS))]


def table1(cells: Mapping[tuple, Cell], budget: str, split: str, variant: str = "") -> Table:
    """Rows = methods and the full set; columns = dataset x bias ratio, at severity 4."""
    columns, keys = [], []
    for dataset in _datasets(cells, budget):
        for ratio in _ratios(cells, budget, dataset):
            columns.append(f"{DATASET_NAMES.get(dataset, dataset)} rho={_fmt_ratio(ratio)}")
            keys.append((dataset, ratio))
    rows = [
        (
            ROW_NAMES[method],
            [cells.get((budget, d, r, TABLE1_SEVERITY, method, split)) for d, r in keys],
        )
        for method in (*METHODS, "full")
    ]
    title = (
        f"Table 1: top-1 accuracy (%) on the {SPLIT_TITLES[split]}, {SPREAD}; "
        f"severity {TABLE1_SEVERITY}; {_budget_title(budget, variant)}"
    )
    return Table(f"table1_{split}", title, "method", columns, rows)


def table2(cells: Mapping[tuple, Cell], budget: str, split: str, variant: str = "") -> Table:
    """DM at bias ratios 0 and 1 (rows, per dataset) x severities 1-4 (columns)."""
    rows = [
        (
            f"{DATASET_NAMES.get(dataset, dataset)} rho={_fmt_ratio(ratio)}",
            [cells.get((budget, dataset, ratio, severity, "dm", split)) for severity in SEVERITIES],
        )
        for dataset in _datasets(cells, budget)
        for ratio in TABLE2_RATIOS
    ]
    title = (
        f"Table 2: DM, top-1 accuracy (%) on the {SPLIT_TITLES[split]}, {SPREAD}, "
        f"by bias severity; {_budget_title(budget, variant)}"
    )
    return Table(
        f"table2_{split}", title, "DM: dataset, bias ratio", [f"severity {s}" for s in SEVERITIES], rows
    )


def write_cells_csv(cells: Iterable[Cell], path: Path) -> None:
    fields = ["budget", "dataset", "bias_ratio", "severity", "method", "split", "mean", "std", "n_repeats"]
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*fields, "source"])
    for cell in sorted(cells, key=lambda c: c.key):
        writer.writerow([getattr(cell, f) for f in fields] + [cell.source])
    _write_text(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    from biasdd.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# --- cells that failed on a cluster ---------------------------------------------------------------------


def read_failed_cells(path: Path) -> list[dict[str, Any]]:
    """The failed cells' records in a `biasdd-cluster` status file (none when the file is absent)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", {})
    except FileNotFoundError:
        return []
    return [record for _, record in sorted(cells.items()) if record.get("state") == "failed"]


def failed_notes(failed: Sequence[Mapping[str, Any]], budget: str, table: str) -> tuple[str, ...]:
    """Lines naming the failed cells that would have filled `table` (table1 or table2) of `budget`."""
    notes = []
    for record in failed:
        if record.get("budget") != budget:
            continue
        in_table1 = record.get("severity") == TABLE1_SEVERITY
        in_table2 = record.get("bias_ratio") in TABLE2_RATIOS
        if (table == "table1" and in_table1) or (table == "table2" and in_table2):
            variant = " ".join(f"--set {e}" for e in record.get("extra") or [])
            notes.append(
                f"- FAILED on the cluster, no result: {record.get('name')} "
                + (f"(a variant: {variant}) " if variant else "")
                + f"(attempts: {record.get('attempts')}; {record.get('error')})"
            )
    return tuple(notes)


# --- curves (matplotlib: see the module docstring) ---------------------------------------------------


def curves_figure(
    cells: Mapping[tuple, Cell], budget: str, dataset: str, path: Path, variant: str = ""
) -> None:
    """Accuracy vs bias ratio per method and the full set, error bars = std, one panel per split."""
    from biasdd.plots import _save, plt  # the Agg backend is set there

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(4.6 * len(SPLITS), 3.6), squeeze=False)
    for ax, split in zip(axes[0], SPLITS, strict=True):
        for method in (*METHODS, "full"):
            points = sorted(
                (c.bias_ratio, 100 * c.mean, 100 * c.std)
                for c in cells.values()
                if (c.budget, c.dataset, c.severity, c.method, c.split)
                == (budget, dataset, TABLE1_SEVERITY, method, split)
            )
            if not points:
                continue
            x, y, err = zip(*points, strict=True)
            style = {"color": "black", "linestyle": "--"} if method == "full" else {}
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=ROW_NAMES[method], **style)
        ax.set_xlabel("bias ratio rho (share of bias-aligned training samples)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(0, 100)
        ax.set_title(SPLIT_TITLES[split], fontsize=9)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{DATASET_NAMES.get(dataset, dataset)}, severity {TABLE1_SEVERITY}; "
        f"{_budget_title(budget, variant)}",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)


# --- the study's findings on CMNIST-DD (docs/protocol.md §8), checked on a folder's Table 1 -------------

CHANCE = 1 / NUM_CLASSES
NEAR_CHANCE = 0.05  # "near or below chance": at most chance + 5 points (our reading of §8)
FULL_HIGH = 0.85  # "the full set stays high" at rho 0.95
NEAR_FULL = 0.10  # "near the full set" at rho 0.1: within 10 points


@dataclass(frozen=True)
class Finding:
    """One of the study's findings against a table's cells: how far it holds, and the spread behind it."""

    claim: str
    values: str  # the cells it rests on, as they read in the table
    margin: float | None  # fraction; >= 0: it holds; None: a cell is missing
    spread: float  # the largest std (fraction) among its cells

    @property
    def verdict(self) -> str:
        if self.margin is None:
            return "not measured (a cell is missing)"
        if self.margin < 0:
            return f"not reproduced: misses by {100 * -self.margin:.2f} points"
        thin = f", less than the spread ({100 * self.spread:.2f})" if self.margin < self.spread else ""
        return f"reproduced: by {100 * self.margin:.2f} points{thin}"


def findings(cells: Mapping[tuple, Cell], budget: str) -> list[Finding]:
    """The four findings of §8 CMNIST-DD's Table 1 on test_conflicting can show, each with its margin."""

    def get(ratio: float, name: str) -> Cell | None:
        return cells.get((budget, "cmnist", ratio, TABLE1_SEVERITY, name, "test_conflicting"))

    def check(
        claim: str, ratio: float, names: Sequence[str], margin: Callable[[dict[str, float]], float]
    ) -> Finding:
        found = {n: get(ratio, n) for n in names}
        values = ", ".join(f"{ROW_NAMES[n]} {_fmt_cell(c, '±') or '-'}" for n, c in found.items())
        if any(c is None for c in found.values()):
            return Finding(claim, values, None, 0.0)
        spread = max(c.std for c in found.values() if c is not None)
        return Finding(claim, values, margin({n: c.mean for n, c in found.items() if c is not None}), spread)

    methods = list(METHODS)
    return [
        check(
            f"rho 0.95: the full set stays high (>= {100 * FULL_HIGH:.0f}%)",
            0.95,
            ["full"],
            lambda v: v["full"] - FULL_HIGH,
        ),
        check(
            f"rho 0.1: every method within {100 * NEAR_FULL:.0f} points of the full set",
            0.1,
            [*methods, "full"],
            lambda v: NEAR_FULL - max(v["full"] - v[m] for m in methods),
        ),
        check(
            "rho 0.95: DM below both DC and DSA",
            0.95,
            methods,
            lambda v: min(v["dc"], v["dsa"]) - v["dm"],
        ),
        check(
            f"rho 1.0: every model near or below chance (<= {100 * (CHANCE + NEAR_CHANCE):.0f}%)",
            1.0,
            [*methods, "full"],
            lambda v: CHANCE + NEAR_CHANCE - max(v.values()),
        ),
    ]


def findings_markdown(found: Sequence[Finding], budget: str, variant: str = "") -> str:
    title = (
        f"**The study's findings on CMNIST-DD (docs/protocol.md §8), severity {TABLE1_SEVERITY}, "
        f"{SPLIT_TITLES['test_conflicting']}; {_budget_title(budget, variant)}**"
    )
    lines = [title, "", "| finding | cells (%) | |", "|---|---|---|"]
    lines += [f"| {f.claim} | {f.values} | {f.verdict} |" for f in found]
    note = (
        "A margin smaller than the spread (the largest std over the networks of the cells it rests on) "
        "is one a seed can move: read it as consistent with the study, not as a measured gap."
    )
    return "\n".join([*lines, "", note]) + "\n"


# --- the command ---------------------------------------------------------------------------------------


def write_report(
    exp_show: Sequence[Mapping[str, Any]], out: Path, failed: Sequence[Mapping[str, Any]] = ()
) -> dict[str, list[Path]]:
    """Write every table and curve for every budget and variant found; returns the files per folder.

    `failed`: records of cells that failed on a cluster (`read_failed_cells`), listed under the tables of
    their budget's reference settings.
    """
    rows = rows_with_cells(exp_show)
    cells = collect_cells(exp_show, rows)
    variants = find_variants(exp_show, rows)
    only_failed = {str(r["budget"]) for r in failed if r.get("budget")} - {v.budget for v in variants}
    variants += [Variant(budget, ()) for budget in sorted(only_failed)]
    if not cells:
        log.warning("no experiment has metrics yet: nothing to report (run `dvc queue status`)")
    written: dict[str, list[Path]] = {}
    for variant in variants:
        view = variant_cells(cells, variant)
        if not view and not (failed and not variant.changes):
            continue  # a budget whose rows have no metrics yet
        budget, note, folder = variant.budget, variant.note(), out / variant.folder
        files = []
        for split in SPLITS:
            for table in (table1(view, budget, split, note), table2(view, budget, split, note)):
                if not variant.changes:
                    table = dataclasses.replace(table, notes=failed_notes(failed, budget, table.name[:6]))
                for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
                    path = folder / f"{table.name}{suffix}"
                    _write_text(path, text)
                    files.append(path)
        if any(c.dataset == "cmnist" for c in view.values()):
            path = folder / "findings_cmnist.md"
            _write_text(path, findings_markdown(findings(view, budget), budget, note))
            files.append(path)
        for dataset in sorted({c.dataset for c in view.values()}):
            path = folder / f"curves_{dataset}.png"
            curves_figure(view, budget, dataset, path, note)
            files.append(path)
        write_cells_csv(view.values(), folder / "cells.csv")
        settings = {
            "budget": budget,
            "changes_from_reference": {k: _loaded(v) for k, v in variant.changes},
            "settings": {k: _loaded(v) for k, v in variant.settings},
            "settings_from": variant.found_in,
        }
        _write_text(folder / "settings.json", json.dumps(settings, indent=1) + "\n")
        files += [folder / "cells.csv", folder / "settings.json"]
        log.info("%s: %d cells -> %s%s", variant.folder, len(view), folder, note)
        written[variant.folder] = files
    return written


def _loaded(value: str) -> Any:
    return value if value == UNSET else json.loads(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="biasdd-report", description="Table 1, Table 2 and accuracy curves from the DVC experiments."
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: .)")
    parser.add_argument(
        "--all-commits", action="store_true", help="also read experiments based on older commits"
    )
    parser.add_argument(
        "--exp-show-json", type=Path, help="read a saved `dvc exp show --json` output instead of running it"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also log each cell that more than one run filled"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        log.setLevel(logging.DEBUG)
    if args.exp_show_json:
        try:
            exp_show = json.loads(args.exp_show_json.read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.error(
                "--exp-show-json %s: %s (valid: what `dvc exp show --json` wrote)", args.exp_show_json, error
            )
            return 2
    else:
        try:
            exp_show = exp_show_json(args.repo, all_commits=args.all_commits)
        except RuntimeError as error:  # `dvc exp show` failed: its own message names the cause
            log.error("%s (valid: --repo a DVC repository; now %s)", " ".join(str(error).split()), args.repo)
            return 2
    failed = read_failed_cells(args.repo / CLUSTER_STATUS)
    for record in failed:
        log.warning("%s failed on the cluster: %s", record.get("name"), record.get("error"))
    written = write_report(exp_show, args.out, failed)
    for files in written.values():  # the CLI prints its study tables
        for path in files:
            if path.name.startswith("table1_test_conflicting") and path.suffix == ".md":
                print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
