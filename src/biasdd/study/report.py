"""The study's tables and curves from DVC experiments: Table 1, Table 2 and accuracy-vs-bias-ratio curves.

    biasdd-report [--out reports] [--repo .] [--all-commits]    # or: python -m biasdd.study.report
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
- `figure2_<dataset>_<method>.png`: the study's Figure 2, a method's synthetic images at rho 0 and 1
  (read back from the runs' DVC outputs; skipped where the local DVC cache lacks them).
- `figure2_<dataset>_<method>.png`: the study's Figure 2, a method's synthetic images at rho 0 and 1
  (read back from the runs' DVC outputs; skipped where the local DVC cache lacks them).
- `curves_<dataset>.png`: accuracy vs bias ratio per method with error bars (std), the full set too,
  at severity 4, one panel per test split.
- `findings_cmnist.md`: the four findings of docs/protocol.md §8 a CMNIST-DD Table 1 shows (the full set
  high at rho 0.95, every method within 10 points of it at rho 0.1, DM below DC and DSA at rho 0.95,
  every model at most 5 points above chance at rho 1.0), each reproduced or not, by how much, and
  whether that margin is smaller than the spread of the cells it rests on.
- `debias_<split>.md` / `.csv` (where debiased runs exist): rows method x debias.mode, columns dataset x
  bias ratio; and `findings_debias.md`: the debiasing targets of docs/protocol.md §9, with margins.
- `cells.csv`: every cell found, long form, with the experiment it came from.
- `settings.json`: the settings the folder's cells were made with, and how they differ from the reference.

Runs that changed `seed` (`--set seed=1`) are a variant each, `<budget>~seed=1`, and are also pooled
with the runs of the same settings but the seed: `<out>/<budget>~seeds/` (with the reference's) and
`<out>/<budget>~<changes>~seeds/` (with a variant's) hold Table 1, the debias table and
`findings_debias.md` of every position run with two seeds or more, each cell the mean ± std over its
seeds (each seed's cell the mean over its evaluation networks), and `cells.csv` with each cell's seeds
and runs. A claim checked there rests on the seeds' mean, and its spread is theirs.

Missing cells stay blank: a partial grid gives partial tables. Each table's title states its budget
and, in a variant's folder, the changed settings.
Cells that failed on a Ray cluster (`biasdd-cluster run` records them in `reports/cluster-status.json`
of the repository; they have no experiment, hence no metrics) are listed under the tables they belong to.
Deviation from STYLE ("only the plotting module imports matplotlib"): the curves live here, next to
the tables they mirror; `biasdd.figures` is reused for the backend set-up and the atomic PNG writer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from biasdd import artifacts, figures
from biasdd.study.cells import (
    UNSET,
    Cell,
    Variant,
    collect_cells,
    find_variants,
    rows_with_cells,
    seed_replicates,
    variant_cells,
)
from biasdd.study.experiments import WORKSPACE, exp_show_json
from biasdd.study.findings import debias_findings, debias_findings_markdown, findings, findings_markdown
from biasdd.study.tables import (
    SEED_SPREAD,
    Table,
    _budget_title,
    debias_table,
    failed_notes,
    has_debias_cells,
    read_failed_cells,
    table1,
    table2,
    write_cells_csv,
)
from biasdd.study.tools import CLUSTER_STATUS
from biasdd.vocab import DATASET_TITLES, METHODS, ROW_TITLES, TABLE1_SEVERITY, TEST_SPLITS

log = logging.getLogger(__name__)


def write_report(
    exp_show: Sequence[Mapping[str, Any]],
    out: Path,
    failed: Sequence[Mapping[str, Any]] = (),
    repo: Path | None = None,
) -> dict[str, list[Path]]:
    """Write every table and curve for every budget and variant found; returns the files per folder.

    `failed`: records of cells that failed on a cluster (`read_failed_cells`), listed under the tables of
    their budget's reference settings. `repo`: the DVC repository whose outputs Figure 2 reads (None: no
    Figure 2).
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
        for split in TEST_SPLITS:
            tables = [table1(view, budget, split, note), table2(view, budget, split, note)]
            if has_debias_cells(view):
                tables.append(debias_table(view, budget, split, note))
            if not variant.changes:
                tables = [
                    dataclasses.replace(t, notes=failed_notes(failed, budget, t.name[:6]))
                    if t.name.startswith(("table1", "table2"))
                    else t
                    for t in tables
                ]
            files += _write_tables(tables, folder)
        if any(c.dataset == "cmnist" for c in view.values()):
            path = folder / "findings_cmnist.md"
            artifacts.write_text(path, findings_markdown(findings(view, budget), budget, note))
            files.append(path)
        if has_debias_cells(view):
            path = folder / "findings_debias.md"
            found = debias_findings(view, budget)
            artifacts.write_text(path, debias_findings_markdown(found, budget, note))
            files.append(path)
        files += write_figure2(view, budget, folder, repo, note)
        for dataset in sorted({c.dataset for c in view.values()}):
            path = folder / f"curves_{dataset}.png"
            name = DATASET_TITLES.get(dataset, dataset)
            title = f"{name}, severity {TABLE1_SEVERITY}; {_budget_title(budget, note)}"
            figures.curves_figure(view, budget, dataset, path, title)
            files.append(path)
        write_cells_csv(view.values(), folder / "cells.csv")
        settings = {
            "budget": budget,
            "changes_from_reference": {k: _loaded(v) for k, v in variant.changes},
            "settings": {k: _loaded(v) for k, v in variant.settings},
            "settings_from": variant.found_in,
        }
        artifacts.write_text(folder / "settings.json", json.dumps(settings, indent=1) + "\n")
        files += [folder / "cells.csv", folder / "settings.json"]
        log.info("%s: %d cells -> %s%s", variant.folder, len(view), folder, note)
        written[variant.folder] = files
    for group, view in seed_replicates(cells, variants):
        folder = f"{group.folder}~{SEEDS_FOLDER}"
        written[folder] = write_seed_tables(view, group, out / folder)
        log.info("%s: %d cells pooled over seeds -> %s", folder, len(view), out / folder)
    return written


SEEDS_FOLDER = "seeds"  # <out>/<budget>[~<changes>]~seeds/: the cells run with several seeds, pooled


def write_seed_tables(view: Mapping[tuple, Cell], group: Variant, folder: Path) -> list[Path]:
    """Table 1, the debias table and its findings, and cells.csv, of the cells pooled over seeds
    (`seed_replicates`): each cell the mean ± std over its seeds, each seed's cell the mean over its
    evaluation networks."""
    budget = group.budget
    seeds = sorted({seed for cell in view.values() for seed in cell.seeds})
    shown = ", ".join(map(str, seeds))
    note = f"{group.note()}; pooled over the runs of seeds {shown} (cells.csv: each cell's seeds and runs)"
    debiased = has_debias_cells(view)
    files = []
    for split in TEST_SPLITS:
        tables = [table1(view, budget, split, note, spread=SEED_SPREAD)]
        if debiased:
            tables.append(debias_table(view, budget, split, note, spread=SEED_SPREAD))
        files += _write_tables(tables, folder)
    if debiased:
        path = folder / "findings_debias.md"
        found = debias_findings(view, budget)
        artifacts.write_text(path, debias_findings_markdown(found, budget, note, over="the seeds"))
        files.append(path)
    write_cells_csv(view.values(), folder / "cells.csv")
    return [*files, folder / "cells.csv"]


def _write_tables(tables: Sequence[Table], folder: Path) -> list[Path]:
    """Each table as `<name>.md` and `<name>.csv` in `folder`."""
    files = []
    for table in tables:
        for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
            artifacts.write_text(folder / f"{table.name}{suffix}", text)
            files.append(folder / f"{table.name}{suffix}")
    return files


FIGURE2_RATIOS = (0.0, 1.0)  # the study's Figure 2: synthetic sets of anti-biased and fully biased data
FIGURE2_PER_CLASS = 5


def write_figure2(
    view: Mapping[tuple, Any], budget: str, folder: Path, repo: Path | None, note: str
) -> list[Path]:
    """`figure2_<dataset>_<method>.png` for every method with plain cells at rho 0 and 1: its synthetic
    sets read back from the runs' DVC outputs (the local cache; a set not there is skipped, logged)."""
    from biasdd.datasets import SyntheticDataset

    written = []
    for dataset in sorted({c.dataset for c in view.values()}):
        for method in METHODS:
            found = [
                view.get((budget, dataset, ratio, TABLE1_SEVERITY, method, "test_conflicting", "none"))
                for ratio in FIGURE2_RATIOS
            ]
            if repo is None or any(cell is None or not cell.rev for cell in found):
                continue
            sets = {}
            for ratio, cell in zip(FIGURE2_RATIOS, found, strict=True):
                rev = None if cell.rev == WORKSPACE else cell.rev
                try:
                    data = SyntheticDataset.from_dvc(f"data/synthetic/{method}.h5", repo=str(repo), rev=rev)
                except Exception as error:  # not in the cache (run elsewhere), or DVC cannot read the rev
                    log.warning("figure 2: %s at rho %g unreadable (%s); skipped", method, ratio, error)
                    break
                sets[f"rho = {ratio:g}"] = (data.images.numpy(), data.targets.numpy(), data.mean, data.std)
            else:
                path = folder / f"figure2_{dataset}_{method}.png"
                name = DATASET_TITLES.get(dataset, dataset)
                title = (
                    f"{ROW_TITLES[method]} synthetic images, {name} severity {TABLE1_SEVERITY}, rho 0 "
                    f"(anti-biased) and 1 (fully biased); {_budget_title(budget, note)}"
                )
                figures.synthetic_by_ratio(sets, FIGURE2_PER_CLASS, path, title)
                written.append(path)
    return written


def _loaded(value: str) -> Any:
    return value if value == UNSET else json.loads(value)


def make_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("biasdd.study").setLevel(logging.DEBUG)  # every part of the report
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
    written = write_report(exp_show, args.out, failed, repo=args.repo)
    for files in written.values():  # the CLI prints its study tables
        for path in files:
            if path.name.startswith("table1_test_conflicting") and path.suffix == ".md":
                print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
