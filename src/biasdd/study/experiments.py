"""Reading DVC's experiments: the rows of `dvc exp show --json`, and which metrics belong to their params.

Every row (the workspace, the baseline commit and each experiment; queued, running or failed ones have
no metrics yet and are skipped) carries its params and the metrics files `metrics/<split>/<name>.json`
its pipeline declares. The workspace's metrics are left out when `dvc status` says a stage is out of
date: its params.yaml then names a point its metrics files were not made from (params edited, or `dvc
exp run` results not applied). A commit's metrics files are left out on the same grounds when its
dvc.lock records their stages (or one upstream) with other param values than its params.yaml
(`stale_metrics`).
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from biasdd.config import section
from biasdd.errors import UnknownKeyError
from biasdd.study.tools import run_tool
from biasdd.vocab import ROW_TITLES, TEST_SPLITS

log = logging.getLogger(__name__)

WORKSPACE = "workspace"


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


def _metric_path(path: str) -> tuple[str, str] | None:
    """(split, name) of a DVC metrics file `metrics/<split>/<name>.json`, else None."""
    parts = Path(path).parts
    if (
        len(parts) != 3
        or parts[0] != "metrics"
        or parts[1] not in TEST_SPLITS
        or not parts[2].endswith(".json")
    ):
        return None
    name = Path(parts[2]).stem
    return (parts[1], name) if name in ROW_TITLES else None


def _row_params(row: Mapping[str, Any]) -> Mapping[str, Any]:
    return _file_data((row.get("data") or {}).get("params"), "params.yaml") or {}
