"""Cells of the study's tables: one method's accuracy on one split at one grid point, and its settings.

A cell's position in the study's grid is (budget, dataset, bias ratio, severity, method, split), read
from the row's params (the values DVC composed for that run). Its settings are the rest of the params
its numbers depend on: those dvc.yaml feeds the stages upstream of its metrics file, less NEUTRAL
(`relevant`). Rows of other settings never share a cell: each budget's tables are made for its
reference settings (those of its first baseline row: the workspace, HEAD, older commits; for a budget
only experiments ran, the newest one's), and every other set of settings a run used is a `Variant`
with tables of its own, `<budget>~<changed params>` (e.g. `quick~distill.repeats=3`), in which the
cells that do not depend on the change (there: the full set) are the reference's. When two rows of the
same settings fill a cell the newest wins (the workspace counts as newest) and a log line says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from biasdd.study.experiments import WORKSPACE, _file_data, _metric_path, _row_params, _timestamp, iter_rows
from biasdd.vocab import DATASETS, EXPERT_METHODS, FULL, LABEL_FREE_MODES, METHODS, SYNCHRONIZED_MODES

log = logging.getLogger(__name__)

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
    mode: str = "none"  # debias.mode of a method's cell (the full set's is always none)
    rev: str = ""  # the git revision of the run (experiment or commit; "workspace"), to read its outputs
    seeds: tuple[int, ...] = ()  # a cell pooled over seeds (`seed_replicates`): the seeds; () = one run

    @property
    def position(self) -> tuple[str, str, float, int, str, str, str]:
        """Where it goes in a budget's tables."""
        return (self.budget, self.dataset, self.bias_ratio, self.severity, self.method, self.split, self.mode)

    @property
    def key(self) -> tuple:
        """One cell per position and settings: runs of other settings never share a cell."""
        return (*self.position, self.settings)


# --- settings: what a cell's numbers depend on besides its grid point ----------------------------------

AXES = ("budget", "dataset", "bias_ratio", "severity")  # the grid point, a cell's position
# Params that change no reported number: where a run computes or stores (device, download.mirror,
# download.cache_dir), which methods ran (each method's cells are its own), checkpoints, the test batch,
# `compute.compile` (compiled == eager up to round-off), the plots and the bias classifier (it scores
# bias, not accuracy). Every other param of a stage upstream of a metrics file (dvc.yaml) counts, but the
# debias and bias_model sections only where the cell's debias.mode reads them (`relevant`):
# tests/test_report.py checks that a cell's settings are exactly those.
NEUTRAL = (
    "device",
    "methods",
    "download.mirror",
    "download.cache_dir",
    "download.fetch",  # whether the stage may fetch; the bytes are MD5-checked either way
    "distill.checkpoint_every",
    "evaluate.batch_test",
    "compute.compile",
    "plot",
    "bias_classifier",
)
UNSET = "unset"  # a param one run has and another lacks (older commits)
# params added after runs were made, each with the value that reproduces the code before it: a run of an
# older commit, which lacks the key, ran with that value, and is not a variant of its own
ADDED_WITH_OLD_BEHAVIOUR = {"bias_model.grouping": "per_group"}
SYNCHRONIZED_LR = "lr_img_synchronized"  # distill.<method>'s key read under SYNCHRONIZED_MODES only
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
    """A run's params, flattened to dotted keys (with ADDED_WITH_OLD_BEHAVIOUR's values where it lacks
    them), less its grid point and the NEUTRAL ones."""
    flat = {**{k: json.dumps(v) for k, v in ADDED_WITH_OLD_BEHAVIOUR.items()}, **_flatten(params)}
    return {k: v for k, v in flat.items() if not _under(k, (*AXES, *NEUTRAL))}


def relevant(settings: Mapping[str, str], method: str, dataset: str, mode: str = "none") -> dict[str, str]:
    """The part of a run's settings that one cell (a method's or the full set's, on `dataset`, distilled
    with debias.mode `mode`) depends on: dvc.yaml's params of the stages upstream of its metrics file. A
    method's cell: not the other methods' distillation and schedules, not the full set's training, and the
    experts only for a method that reads them (MTT); the full set's: no distillation, no synthetic-set
    evaluation, no DSA augmentation, no experts. The debias section only under a debias mode (its `mode`
    is the cell's position), the bias model only under a mode that reads it, a method's
    `lr_img_synchronized` only under synchronized matching."""
    other_datasets = [d for d in (*DATASETS, *_schedule_datasets(settings)) if d != dataset]
    drop = [f"evaluate.synthetic.schedule.{d}" for d in other_datasets]
    if method == FULL or mode == "none":
        drop += ["debias", "bias_model"]
    else:
        drop.append("debias.mode")
        if mode not in LABEL_FREE_MODES:
            drop.append("bias_model")
    if mode not in SYNCHRONIZED_MODES:
        drop += [f"distill.{m}.{SYNCHRONIZED_LR}" for m in METHODS]
    if dataset != "cmnist":
        drop.append("cmnist")
    if method == "full":
        drop += ["distill", "evaluate.synthetic", "augment", "experts"]
    else:
        drop.append("evaluate.full")
        drop += [f"distill.{m}" for m in METHODS if m != method]
        drop += [f"evaluate.synthetic.schedule.{dataset}.{m}" for m in METHODS if m != method]
        if method not in EXPERT_METHODS:
            drop.append("experts")  # MTT's expert trajectories; no other method reads them
    return {k: v for k, v in settings.items() if not _under(k, drop)}


def _schedule_datasets(settings: Mapping[str, str]) -> set[str]:
    prefix = "evaluate.synthetic.schedule."
    return {k[len(prefix) :].split(".")[0] for k in settings if k.startswith(prefix)}


def cell_settings(settings: Mapping[str, str], method: str, dataset: str, mode: str = "none") -> Settings:
    return tuple(sorted(relevant(settings, method, dataset, mode).items()))


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


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
    debias = str((params.get("debias") or {}).get("mode", "none"))  # the methods' cells' mode
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
        repeats = (evaluate.get("full" if name == FULL else "synthetic") or {}).get("repeats")
        mode = "none" if name == FULL else debias  # the full set is never distilled
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
                settings=cell_settings(settings, name, str(point["dataset"]), mode),
                mode=mode,
                rev=str(row.get("rev") or ""),
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
            dict(self.settings), cell.method, cell.dataset, cell.mode
        )


def _plain(value: str) -> str:
    return value if value == UNSET else json.dumps(json.loads(value), separators=(",", ":"))


def reference_settings(exp_show: Sequence[Mapping[str, Any]], rows: RowCells) -> dict[str, Variant]:
    """Each budget's reference settings: those of the first baseline row of that budget (the workspace,
    then HEAD, then, with --all-commits, older commits), so the repository's own settings; for a budget
    that only experiments ran, those of the experiment closest to the repository's own (the fewest
    settings that differ from the first baseline row's, the budget's own aside), the newest of equals: a
    newer run that changed a setting at that budget is a variant of it, not its reference."""
    refs: dict[str, Variant] = {}
    for row in exp_show:
        budget = _row_params(row).get("budget")
        if budget is not None and str(budget) not in refs:
            settings = tuple(sorted(run_settings(_row_params(row)).items()))
            refs[str(budget)] = Variant(str(budget), settings, found_in=str(row.get("rev", "?"))[:9])
    own = dict(next(iter(refs.values())).settings) if refs else {}

    def distance(row: Mapping[str, Any]) -> int:
        settings = run_settings(_row_params(row))
        return sum(settings.get(k, UNSET) != own.get(k, UNSET) for k in settings.keys() | own.keys())

    best: dict[str, tuple[int, datetime, Mapping[str, Any]]] = {}
    for row, _ in rows:
        budget, stamp = _row_params(row).get("budget"), _timestamp((row.get("data") or {}).get("timestamp"))
        if budget is None or str(budget) in refs or stamp is None:
            continue
        far = distance(row)
        kept = best.get(str(budget))
        if kept is None or (far, -stamp.timestamp()) < (kept[0], -kept[1].timestamp()):
            best[str(budget)] = (far, stamp, row)
    for budget, (_, _, row) in best.items():
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
            keys |= relevant(ours, c.method, c.dataset, c.mode).keys()
            keys |= relevant(theirs, c.method, c.dataset, c.mode).keys()
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


# --- seed replicates: one cell per position, pooled over runs that differ in `seed` alone -------------

SEED = "seed"


def seed_replicates(cells: Mapping[tuple, Cell], variants: Sequence[Variant]) -> list[tuple[Variant, dict]]:
    """The runs that differ only in `seed`, pooled: variants are grouped by their changes other than `seed`
    (the budget's reference, whose seed is its own, with the variants whose only change is `seed`; a
    variant such as `bias_model.grouping=clustered` with those that add a `seed` to it), and every
    position a group ran with two seeds or more becomes one cell: the mean over the seeds of each seed's
    cell (itself the mean over its evaluation networks), the population std of those means (numpy's
    ddof=0, as the networks' std), the seeds in `seeds` (their number in `n_repeats`), the runs in
    `source`. Returns (the group's settings as a Variant, its pooled cells by position) for each group
    with such a position; positions with one seed are left out."""
    refs = {v.budget: dict(v.settings) for v in variants if not v.changes}
    groups: dict[tuple, list[Variant]] = defaultdict(list)
    for variant in variants:
        groups[(variant.budget, tuple(c for c in variant.changes if c[0] != SEED))].append(variant)
    pooled = []
    for (budget, rest), members in sorted(groups.items(), key=lambda item: item[0]):
        if budget in refs and not any(v.changes == rest for v in members):  # the reference's seed, too
            settings = {k: v for k, v in {**refs[budget], **dict(rest)}.items() if v != UNSET}
            members = [Variant(budget, tuple(sorted(settings.items())), rest), *members]
        found: dict[tuple, list[tuple[int, Cell]]] = defaultdict(list)
        for variant in members:
            seed = dict(variant.settings).get(SEED, UNSET)
            if seed == UNSET:
                continue
            for position, cell in variant_cells(cells, variant).items():
                found[position].append((int(json.loads(seed)), cell))
        view = {}
        for position, replicates in found.items():
            if len({seed for seed, _ in replicates}) < 2:
                continue
            replicates.sort(key=lambda pair: pair[0])
            means = [cell.mean for _, cell in replicates]
            view[position] = dataclasses.replace(
                replicates[0][1],
                mean=statistics.fmean(means),
                std=statistics.pstdev(means),
                n_repeats=len(replicates),
                source="; ".join(cell.source for _, cell in replicates),
                timestamp=None,
                settings=(),
                rev="",
                seeds=tuple(seed for seed, _ in replicates),
            )
        if view:
            settings = next((v.settings for v in members if v.changes == rest), members[0].settings)
            pooled.append((Variant(budget, settings, rest), view))
    return pooled
