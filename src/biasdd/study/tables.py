"""The study's tables from a variant's cells: Table 1 (methods x dataset and bias ratio), Table 2 (DM by
severity), the long-form cells.csv, and the notes on cells that failed on a cluster.

Cells are top-1 accuracy in %, mean +- std over the evaluation networks; missing cells stay blank, so a
partial grid gives partial tables. Each title states its budget and, in a variant's folder, the
changed settings.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.study.cells import Cell
from biasdd.vocab import (
    BIAS_RATIOS,
    BUDGET_NOTES,
    DATASET_TITLES,
    DATASETS,
    DEBIAS_MODES,
    DEBIAS_TITLES,
    METHODS,
    ROW_TITLES,
    SEVERITIES,
    SPLIT_TITLES,
    SWEEP_RATIOS,
    TABLE1_SEVERITY,
)

# --- tables ------------------------------------------------------------------------------------------


SPREAD = "mean ± std over the evaluation networks, (n=1) where one network was trained"
SEED_SPREAD = (
    "mean ± std over seeds (each seed's cell the mean over its evaluation networks; the runs pooled "
    "differ in `seed` alone), positions run with one seed left out"
)


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:g}"


def _fmt_cell(cell: Cell | None, plus_minus: str) -> str:
    if cell is None:
        return ""
    if cell.seeds:  # pooled over seeds: its std is theirs
        return f"{100 * cell.mean:.2f} {plus_minus} {100 * cell.std:.2f} ({len(cell.seeds)} seeds)"
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
        buffer = io.StringIO()
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


def table1(
    cells: Mapping[tuple, Cell], budget: str, split: str, variant: str = "", spread: str = SPREAD
) -> Table:
    """Rows = methods and the full set; columns = dataset x bias ratio, at severity 4."""
    columns, keys = [], []
    for dataset in _datasets(cells, budget):
        for ratio in _ratios(cells, budget, dataset):
            columns.append(f"{DATASET_TITLES.get(dataset, dataset)} rho={_fmt_ratio(ratio)}")
            keys.append((dataset, ratio))
    rows = [
        (
            ROW_TITLES[method],
            [cells.get((budget, d, r, TABLE1_SEVERITY, method, split, "none")) for d, r in keys],
        )
        for method in (*METHODS, "full")
    ]
    title = (
        f"Table 1: top-1 accuracy (%) on the {SPLIT_TITLES[split]}, {spread}; "
        f"severity {TABLE1_SEVERITY}; {_budget_title(budget, variant)}"
    )
    return Table(f"table1_{split}", title, "method", columns, rows)


def table2(cells: Mapping[tuple, Cell], budget: str, split: str, variant: str = "") -> Table:
    """DM at bias ratios 0 and 1 (rows, per dataset) x severities 1-4 (columns)."""
    rows = [
        (
            f"{DATASET_TITLES.get(dataset, dataset)} rho={_fmt_ratio(ratio)}",
            [cells.get((budget, dataset, ratio, severity, "dm", split, "none")) for severity in SEVERITIES],
        )
        for dataset in _datasets(cells, budget)
        for ratio in SWEEP_RATIOS
    ]
    title = (
        f"Table 2: DM, top-1 accuracy (%) on the {SPLIT_TITLES[split]}, {SPREAD}, "
        f"by bias severity; {_budget_title(budget, variant)}"
    )
    return Table(
        f"table2_{split}", title, "DM: dataset, bias ratio", [f"severity {s}" for s in SEVERITIES], rows
    )


def has_debias_cells(cells: Mapping[tuple, Cell]) -> bool:
    return any(c.mode != "none" for c in cells.values())


def debias_table(
    cells: Mapping[tuple, Cell], budget: str, split: str, variant: str = "", spread: str = SPREAD
) -> Table:
    """Rows = method x debias.mode (those with a cell); columns = dataset x bias ratio, at severity 4."""
    columns, keys = [], []
    debiased = {c.dataset for c in cells.values() if c.mode != "none"}
    for dataset in [d for d in _datasets(cells, budget) if d in debiased]:
        for ratio in _ratios(cells, budget, dataset):
            columns.append(f"{DATASET_TITLES.get(dataset, dataset)} rho={_fmt_ratio(ratio)}")
            keys.append((dataset, ratio))
    present = {(c.method, c.mode) for c in cells.values() if c.budget == budget}
    methods = {method for method, _ in present}  # every method's plain row, its debiased rows where run
    rows = [
        (
            f"{ROW_TITLES[method]} · {DEBIAS_TITLES[mode]}",
            [cells.get((budget, d, r, TABLE1_SEVERITY, method, split, mode)) for d, r in keys],
        )
        for method in METHODS
        for mode in DEBIAS_MODES
        if (method, mode) in present or (method in methods and mode == "none")
    ]
    title = (
        f"Debiased distillation: top-1 accuracy (%) on the {SPLIT_TITLES[split]}, {spread}; method x "
        f"debias.mode (docs/protocol.md §9), severity {TABLE1_SEVERITY}; {_budget_title(budget, variant)}"
    )
    return Table(f"debias_{split}", title, "method · debias.mode", columns, rows)


def write_cells_csv(cells: Iterable[Cell], path: Path) -> None:
    fields = [
        "budget",
        "dataset",
        "bias_ratio",
        "severity",
        "method",
        "mode",
        "split",
        "mean",
        "std",
        "n_repeats",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*fields, "seeds", "source"])
    for cell in sorted(cells, key=lambda c: c.key):
        seeds = " ".join(str(seed) for seed in cell.seeds)  # pooled cells only
        writer.writerow([getattr(cell, f) for f in fields] + [seeds, cell.source])
    artifacts.write_text(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    from biasdd.artifacts import atomic_path

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
        in_table2 = record.get("bias_ratio") in SWEEP_RATIOS
        if (table == "table1" and in_table1) or (table == "table2" and in_table2):
            variant = " ".join(f"--set {e}" for e in record.get("extra") or [])
            notes.append(
                f"- FAILED on the cluster, no result: {record.get('name')} "
                + (f"(a variant: {variant}) " if variant else "")
                + f"(attempts: {record.get('attempts')}; {record.get('error')})"
            )
    return tuple(notes)
