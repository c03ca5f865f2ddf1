"""biasdd.study.report (tables and curves from `dvc exp show --json`) and biasdd.study.grid (queueing
the grid).

The unit tests build `dvc exp show --json` output in the schema of DVC 3.67 (captured once from a tiny
repository: a workspace row, baseline rows, and under each baseline `experiments: [{"name", "executor",
"revs": [row]}]`; a queued experiment has an executor state `queued` and no metrics). The slow test
queues two real tiny experiments, runs the queue and reports.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from biasdd import vocab
from biasdd.study import cells as cellmod
from biasdd.study import experiments, findings, grid, report, tables, tools

from .tiny import make_repo, run

POINT = {"budget": "quick", "dataset": "cmnist", "bias_ratio": 0.95, "severity": 4}


def _metrics(acc: float, std: float) -> dict:
    """One `metrics/<split>/<name>.json` entry as `dvc exp show --json` gives it."""
    return {
        "data": {
            "acc": acc,
            "acc_sd": std,
            "conflicting": acc,
            "worst": 0.0,
        }
    }


def _all(acc: float, names=None) -> dict:
    """Metrics of the study's rows (dc, dsa, dm, full: +0.01 each) on both splits (uniform: +0.1); MTT,
    not in the default run, has none unless `names` says so."""
    names = [*vocab.STUDY_METHODS, vocab.FULL] if names is None else names
    out = {}
    for i, n in enumerate(names):
        out[f"metrics/test_conflicting/{n}.json"] = _metrics(acc + i / 100, 0.01)
        out[f"metrics/test_uniform/{n}.json"] = _metrics(acc + i / 100 + 0.1, 0.01)
        out[f"metrics/bias/{n}.json"] = {"data": {"share": 0.9, "delta": 0.0}}
    return out


def _row(
    rev: str, name: str | None, timestamp: str | None, metrics: dict, params: dict | None = None, **point
) -> dict:
    params = {
        **POINT,
        **point,
        "evaluate": {"synthetic": {"repeats": 2}, "full": {"repeats": 2}},
        **(params or {}),
    }
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "timestamp": timestamp,
            "params": {"params.yaml": {"data": params}},
            "metrics": metrics,
            "deps": {},
            "outs": {},
            "meta": {"has_checkpoints": False},
        },
        "error": None,
        "experiments": None,
    }


def _exp(row: dict, state: str = "success") -> dict:
    executor = None if state == "success" else {"state": state, "name": "dvc-task", "local": {}}
    return {"name": row["name"], "executor": executor, "revs": [row]}


def _exp_show(*experiments: dict, workspace: dict | None = None, baseline: dict | None = None) -> list:
    base = baseline or _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5))
    base["experiments"] = [_exp(e, e.pop("_state", "success")) for e in experiments]
    params = base["data"]["params"]["params.yaml"]["data"]
    ws = workspace or _row("workspace", None, None, base["data"]["metrics"], params)  # HEAD's, applied
    return [ws, base]


def _by_position(cells: dict) -> dict:
    """`collect_cells`'s cells keyed by position alone (the rows here share their settings)."""
    by_position = {cell.position: cell for cell in cells.values()}
    assert len(by_position) == len(cells)
    return by_position


def _csv(path: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    return {r[0]: dict(zip(rows[0][1:], r[1:], strict=True)) for r in rows[1:]}


def test_partial_grid_blanks_and_study_layout(tmp_path):
    exp = _row("b" * 40, "cmnist-rho0.8-sev4-quick", "2026-01-01T11:00:00", _all(0.3), bias_ratio=0.8)
    queued = _row("c" * 40, "cmnist-rho0-sev4-quick", "2026-01-01T12:00:00", {})
    queued["_state"] = "queued"
    running = _row("e" * 40, "cmnist-rho0.1-sev4-quick", "2026-01-01T12:00:00", _all(0.9), bias_ratio=0.1)
    running["_state"] = "running"  # its metrics may be half the baseline's: not reported yet
    written = report.write_report(_exp_show(exp, queued, running), tmp_path)
    assert list(written) == ["quick"]
    table = _csv(tmp_path / "quick/table1_test_conflicting.csv")
    assert list(table) == ["DC", "DSA", "DM", "MTT", "Full set"]
    assert all(value == "" for value in table["MTT"].values())  # a row of blanks until MTT is run
    columns = list(table["DC"])
    assert columns[:6] == [f"CMNIST-DD rho={r}" for r in ("0", "0.1", "0.5", "0.8", "0.95", "1")]
    assert columns[6:] == [f"CCIFAR10-DD rho={r}" for r in ("0", "0.1", "0.5", "0.8", "0.95", "1")]
    assert (
        table["DC"]["CMNIST-DD rho=0.8"] == "30.00 +- 1.00"
    )  # ROW_NAMES order: dc, dsa, dm, full (+0.01 each)
    assert table["Full set"]["CMNIST-DD rho=0.95"] == "53.00 +- 1.00"
    assert table["DM"]["CMNIST-DD rho=0.95"] == "52.00 +- 1.00"
    assert table["DC"]["CMNIST-DD rho=0"] == ""  # queued, no metrics yet: blank
    assert table["DC"]["CMNIST-DD rho=0.1"] == ""  # running
    assert all(table[m][c] == "" for m in table for c in columns[6:])
    uniform = _csv(tmp_path / "quick/table1_test_uniform.csv")
    assert uniform["DC"]["CMNIST-DD rho=0.8"] == "40.00 +- 1.00"
    markdown = (tmp_path / "quick/table1_test_conflicting.md").read_text()
    assert "budget: quick" in markdown.splitlines()[0] and "severity 4" in markdown.splitlines()[0]
    assert markdown.splitlines()[2].startswith("| method | CMNIST-DD rho=0 |")
    assert "| DC |  |  |  | 30.00 ± 1.00 | 50.00 ± 1.00 |" in markdown
    table2 = _csv(tmp_path / "quick/table2_test_conflicting.csv")
    assert list(table2) == [f"{d} rho={r}" for d in ("CMNIST-DD", "CCIFAR10-DD") for r in ("0", "1")]
    assert all(v == "" for row in table2.values() for v in row.values())  # no rho 0 / 1 yet
    png = (tmp_path / "quick/curves_cmnist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "quick/curves_ccifar10.png").exists()


def test_cells_count_their_own_networks():
    """Each row's spread is over its own evaluation networks (evaluate.synthetic.repeats for the
    methods, evaluate.full.repeats for the full set); one network shows no ± 0.00."""
    evaluate = {"synthetic": {"repeats": 3}, "full": {"repeats": 1}}
    cells = cellmod.cells_from_row(
        _row("b" * 40, "e1", "2026-01-02T10:00:00", _all(0.5), {"evaluate": evaluate})
    )
    by_name = {c.method: c for c in cells if c.split == "test_conflicting"}
    assert by_name["dm"].n_repeats == 3 and by_name["full"].n_repeats == 1
    assert tables._fmt_cell(by_name["dm"], "±") == "52.00 ± 1.00"
    assert tables._fmt_cell(by_name["full"], "±") == "53.00 (n=1)"


def test_table2_from_dm_only_experiments(tmp_path):
    """A severity-sweep experiment runs DM's stages and the full set (`methods: [dm]`): DVC reports only
    the metrics its pipeline declares, and its params give the grid point."""
    sweep = []
    for i, severity in enumerate((1, 2, 3)):
        metrics = _all(0.2 + severity / 10, names=["dm", "full"])
        sweep.append(
            _row(
                f"{i}" * 40,
                f"cmnist-dm-rho1-sev{severity}-quick",
                f"2026-01-02T0{i}:00:00",
                metrics,
                params={"methods": ["dm"]},
                bias_ratio=1.0,
                severity=severity,
            )
        )
    report.write_report(_exp_show(*sweep), tmp_path)
    table2 = _csv(tmp_path / "quick/table2_test_conflicting.csv")
    assert table2["CMNIST-DD rho=1"] == {
        "severity 1": "30.00 +- 1.00",
        "severity 2": "40.00 +- 1.00",
        "severity 3": "50.00 +- 1.00",
        "severity 4": "",
    }
    assert table2["CMNIST-DD rho=0"] == dict.fromkeys(table2["CMNIST-DD rho=0"], "")
    table1 = _csv(tmp_path / "quick/table1_test_conflicting.csv")
    assert table1["DM"]["CMNIST-DD rho=1"] == ""  # severity != 4 is not Table 1's


def test_debiased_experiments_fill_the_debias_table_not_table1(tmp_path):
    """A `debias.mode` run is its method's row of the debias table, never Table 1's (regression: a
    `debias.mode=groups` experiment once filled Table 1's DM cell with its debiased number); its full-set
    cell (never distilled) is the plain one, and the debiasing targets are checked with their margins."""

    def debiased(name: str, mode: str, acc: float, ratio: float = 0.95) -> dict:
        return _row(name * 40, f"dm-{mode}", "2026-01-03T10:00:00", _all(acc), {"debias": {"mode": mode}},
                    bias_ratio=ratio)  # fmt: skip

    rows = [
        _row("1" * 40, "plain-rho0.1", "2026-01-02T10:00:00", _all(0.8), bias_ratio=0.1),
        debiased("2", "groups", 0.7),
        debiased("3", "fairdd", 0.75),
        debiased("4", "inferred_fairdd", 0.78),
        debiased("5", "inferred_fairdd", 0.79, ratio=0.1),
    ]
    written = report.write_report(_exp_show(*rows), tmp_path)
    assert list(written) == ["quick"]  # one set of settings: the mode is a cell's position
    table1 = _csv(tmp_path / "quick/table1_test_uniform.csv")
    assert table1["DM"]["CMNIST-DD rho=0.95"] == "62.00 +- 1.00"  # the baseline's _all(0.5), not a mode's
    debias = _csv(tmp_path / "quick/debias_test_uniform.csv")
    assert list(debias) == [
        f"{title} · {mode}"
        for title in ("DC", "DSA", "DM")
        for mode in ("none", "groups (labels)", "FairDD (labels)", "inferred FairDD (no labels)")
    ]
    assert debias["DM · FairDD (labels)"]["CMNIST-DD rho=0.95"] == "87.00 +- 1.00"
    assert debias["DM · none"]["CMNIST-DD rho=0.1"] == "92.00 +- 1.00"
    assert debias["DM · groups (labels)"]["CMNIST-DD rho=0.1"] == ""
    found = (tmp_path / "quick/findings_debias.md").read_text()
    assert "| DM: the best label-free mode at rho 0.95 within 1 point of DM on unbiased data" in found
    lines = {
        line.split(" | ")[0].lstrip("| "): line for line in found.splitlines() if line.startswith("| DM")
    }
    unbiased = (
        "DM: the best label-free mode at rho 0.95 within 1 point of DM on unbiased data (none at rho 0.1)"
    )
    assert lines[unbiased].endswith("does not hold: misses by 1.00 points |")  # 90.00 against 92.00 - 1
    fairdd = "DM: the best label-free mode at rho 0.95 no more than 1 point below FairDD (labels)"
    assert lines[fairdd].endswith("holds: by 4.00 points |")
    # at rho 0.1 the modes that ran are compared (inferred_fairdd 91.00 against none 92.00 - 1) and those
    # that did not are named; at rho 1.0 nothing debiased ran
    at_01 = (
        "DM at rho 0.1: no mode more than 1 point below none"
        " (not run: groups, fairdd, inferred, inferred_groups)"
    )
    assert lines[at_01].endswith("| holds: by 0.00 points, less than the spread (1.00) |")
    at_1 = "DM at rho 1.0 (no bias-conflicting sample): every mode runs"
    assert lines[at_1].endswith("| not measured (a cell is missing) |")


def test_runs_that_change_only_the_seed_are_pooled_over_seeds(tmp_path):
    """Runs of `--set seed=N` are a variant each, and the positions run with two seeds or more are pooled
    with the reference's in `<budget>~seeds/`: mean ± population std over the seeds of each seed's cell;
    a run that changed another setting too is not a replicate, a position with one seed is left out."""

    def run_of(name: str, acc: float, seed: int, ratio: float = 0.95, names=None, **params) -> dict:
        params = {**_with(**params.pop("distill", {})), "seed": seed, **params}
        metrics = _all(acc, names)
        return _row(name * 40, f"s{seed}-{acc}", "2026-01-02T10:00:00", metrics, params, bias_ratio=ratio)

    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), {**_with(), "seed": 0})
    rows = [
        run_of("1", 0.6, 1),
        run_of("2", 0.7, 2),
        run_of("3", 0.9, 1, names=["dc"], distill={"dc.lr_img": 10.0}),  # seed and DC's rate: no replicate
        run_of("4", 0.2, 2, ratio=0.1),  # one seed at rho 0.1
        run_of("7", 0.8, 2, names=["dc"], distill={"dc.lr_img": 10.0}),
        run_of("5", 0.75, 0, debias={"mode": "fairdd"}),
        run_of("6", 0.85, 1, debias={"mode": "fairdd"}),
    ]
    written = report.write_report(_exp_show(*rows, baseline=base), tmp_path)
    assert {"quick~seed=1", "quick~seed=2", "quick~seeds"} <= set(written)
    pooled = _csv(tmp_path / "quick~seeds/table1_test_conflicting.csv")
    assert pooled["DC"]["CMNIST-DD rho=0.95"] == "60.00 +- 8.16 (3 seeds)"  # 50, 60, 70
    assert pooled["Full set"]["CMNIST-DD rho=0.95"] == "63.00 +- 8.16 (3 seeds)"
    assert pooled["DC"]["CMNIST-DD rho=0.1"] == ""  # one seed: left out
    debias = _csv(tmp_path / "quick~seeds/debias_test_uniform.csv")
    assert debias["DM · FairDD (labels)"]["CMNIST-DD rho=0.95"] == "92.00 +- 5.00 (2 seeds)"  # 87, 97
    title = (tmp_path / "quick~seeds/debias_test_uniform.md").read_text().splitlines()[0]
    assert "mean ± std over seeds" in title and "pooled over the runs of seeds 0, 1, 2" in title
    found = (tmp_path / "quick~seeds/findings_debias.md").read_text()
    assert "largest std over the seeds" in found
    assert "fairdd at rho 0.95 92.00 ± 5.00 (2 seeds)" in found
    cells = list(csv.DictReader(io.StringIO((tmp_path / "quick~seeds/cells.csv").read_text())))
    dc = next(c for c in cells if (c["method"], c["split"], c["mode"]) == ("dc", "test_conflicting", "none"))
    assert dc["seeds"] == "0 1 2" and dc["n_repeats"] == "3"
    assert dc["source"] == "workspace; s1-0.6 (1111111); s2-0.7 (2222222)"  # not s1-0.9
    # a variant's runs pool with its own seed replicates, not the reference's: DC at rate 10, seeds 1 and 2
    assert "quick~distill.dc.lr_img=10.0~seeds" in written
    rate10 = _csv(tmp_path / "quick~distill.dc.lr_img=10.0~seeds/table1_test_conflicting.csv")
    assert rate10["DC"]["CMNIST-DD rho=0.95"] == "85.00 +- 5.00 (2 seeds)"  # 90, 80
    assert rate10["DM"]["CMNIST-DD rho=0.95"] == pooled["DM"]["CMNIST-DD rho=0.95"]  # no DC param in DM
    title = (tmp_path / "quick~distill.dc.lr_img=10.0~seeds/table1_test_conflicting.md").read_text()
    assert "settings changed from quick/'s: distill.dc.lr_img=10.0; pooled over the runs of seeds" in title
    # the variants themselves are untouched: seed 1's DC is its own run's
    assert _csv(tmp_path / "quick~seed=1/table1_test_conflicting.csv")["DC"]["CMNIST-DD rho=0.95"] == (
        "60.00 +- 1.00"
    )


def test_no_seed_replicates_no_seeds_folder(tmp_path):
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), {**_with(), "seed": 0})
    other = _row(
        "b" * 40, "lr10", "2026-01-02T10:00:00", _all(0.7), {**_with(**{"dc.lr_img": 10.0}), "seed": 0}
    )
    assert "quick~seeds" not in report.write_report(_exp_show(other, baseline=base), tmp_path)


def test_newest_wins_and_says_so(tmp_path, caplog):
    old = _row("1" * 40, "old", "2026-01-01T11:00:00", _all(0.3), bias_ratio=0.8)
    new = _row("2" * 40, "new", "2026-01-01T12:00:00", _all(0.4), bias_ratio=0.8)
    with caplog.at_level(logging.DEBUG, logger="biasdd.study"):
        cells = _by_position(cellmod.collect_cells(_exp_show(new, old)))
    cell = cells[("quick", "cmnist", 0.8, 4, "dc", "test_conflicting", "none")]
    assert cell.mean == pytest.approx(0.4) and cell.source.startswith("new")
    per_cell = [r for r in caplog.records if "old (1111111)" in r.getMessage()]
    assert len(per_cell) == 8 and all(r.levelno == logging.DEBUG for r in per_cell)
    assert all("taking the newest, new (2222222)" in r.getMessage() for r in per_cell)
    summary = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(summary) == 1 and summary[0].getMessage().startswith("8 cell(s) filled by more than one run")


def test_overridden_cells_log_one_info_line(caplog):
    """Regression: `--all-commits` logged one INFO line per overridden cell, hundreds in a real history."""
    rows = [
        _row(str(i) * 40, f"run{i}", f"2026-01-01T1{i}:00:00", _all(0.1 * i), bias_ratio=0.8)
        for i in range(1, 5)
    ]
    with caplog.at_level(logging.INFO, logger="biasdd.study"):
        cellmod.collect_cells(_exp_show(*rows))
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert caplog.records[0].getMessage().startswith("24 cell(s)")


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_verbose_lists_each_overridden_cell(tmp_path, caplog, verbose):
    old = _row("1" * 40, "old", "2026-01-01T11:00:00", _all(0.3), bias_ratio=0.8)
    new = _row("2" * 40, "new", "2026-01-01T12:00:00", _all(0.4), bias_ratio=0.8)
    shown = tmp_path / "exp_show.json"
    shown.write_text(json.dumps(_exp_show(new, old)))
    argv = ["--exp-show-json", str(shown), "--out", str(tmp_path / "reports")] + ["--verbose"] * verbose
    try:
        with caplog.at_level(logging.INFO):  # the root logger at INFO, as the CLI sets it
            caplog.handler.setLevel(logging.DEBUG)  # pass what the CLI's own handler would
            assert report.main(argv) == 0
    finally:
        logging.getLogger("biasdd.study").setLevel(logging.NOTSET)
    per_cell = [r for r in caplog.records if "old (1111111)" in r.getMessage()]
    assert len(per_cell) == (8 if verbose else 0)
    assert any(r.getMessage().startswith("8 cell(s) filled") for r in caplog.records)


def test_workspace_counts_as_newest():
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5))
    workspace = _row("workspace", None, None, _all(0.6))
    cells = _by_position(cellmod.collect_cells(_exp_show(workspace=workspace, baseline=base)))
    assert cells[("quick", "cmnist", 0.95, 4, "full", "test_conflicting", "none")].source == "workspace"


def test_stale_workspace_is_left_out(monkeypatch, tmp_path):
    """Regression: params edited (DC's learning rate), an experiment run but not applied: the workspace's
    params.yaml named the same point as the experiment, its metrics were the old run's, and as the
    newest row they filled the cell. With `dvc status` out of date the workspace is not reported."""
    exp = _row("e" * 40, "cmnist-rho0.95-sev4-quick", "2026-01-02T00:00:00", _all(0.2))
    stale = _row("workspace", None, None, _all(0.6))
    shown = json.dumps(_exp_show(exp, workspace=stale))
    experiment = "cmnist-rho0.95-sev4-quick (eeeeeee)"
    up_to_date, stale_status = "{}", '{"distill@dc": [{"changed deps": {"params.yaml": "modified"}}]}'
    for status, source, mean in ((up_to_date, "workspace", 0.6), (stale_status, experiment, 0.2)):

        def fake_tool(cmd, repo, status=status):
            stdout = status if cmd[1] == "status" else shown
            return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr="")

        monkeypatch.setattr(experiments, "run_tool", fake_tool)
        out = tmp_path / str(status == up_to_date)
        assert report.main(["--out", str(out), "--repo", str(tmp_path)]) == 0
        rows = list(csv.DictReader(io.StringIO((out / "quick/cells.csv").read_text())))
        cells = {(r["method"], r["split"]): r for r in rows}
        assert cells[("dc", "test_conflicting")]["source"] == source
        assert float(cells[("dc", "test_conflicting")]["mean"]) == pytest.approx(mean)


@pytest.mark.parametrize(
    ("returncode", "stdout", "current"),
    [(0, "{}", True), (0, '{"distill@dc": [{"changed deps": {"params.yaml": "modified"}}]}', False),
     (1, "", True), (0, "not json", True)],
)  # fmt: skip
def test_workspace_is_current_reads_dvc_status(monkeypatch, tmp_path, returncode, stdout, current):
    """{} = up to date; stages listed = stale; a failed or unreadable status keeps the workspace."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")

    monkeypatch.setattr(experiments.subprocess, "run", fake_run)
    assert experiments.workspace_is_current(tmp_path) is current
    assert calls[0][1:] == ["status", "--json"]


def test_one_table_per_budget(tmp_path):
    paper = _row("d" * 40, "cmnist-rho0.95-sev4-paper", "2026-01-03T00:00:00", _all(0.7), budget="paper")
    written = report.write_report(_exp_show(paper), tmp_path)
    assert sorted(written) == ["paper", "quick"]
    for budget in ("paper", "quick"):
        for name in ("table1_test_conflicting", "table2_test_conflicting", "table1_test_uniform"):
            title = (tmp_path / budget / f"{name}.md").read_text().splitlines()[0]
            assert f"budget: {budget}" in title
    assert _csv(tmp_path / "paper/table1_test_conflicting.csv")["DC"]["CMNIST-DD rho=0.95"] == "70.00 +- 1.00"
    assert _csv(tmp_path / "quick/table1_test_conflicting.csv")["DC"]["CMNIST-DD rho=0.95"] == "50.00 +- 1.00"
    cells = (tmp_path / "paper/cells.csv").read_text().splitlines()
    assert len(cells) == 1 + 8 and all(",paper," not in c or c.startswith("paper,") for c in cells)


DISTILL = {"repeats": 1, "checkpoint_every": 5, "dc": {"lr_img": 30.0}, "dm": {"iterations": 300}}


def _with(**changes) -> dict:
    """The tests' run params: `distill` as DISTILL, with `changes` (dotted keys) applied."""
    distill = json.loads(json.dumps(DISTILL))
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = distill
        for part in path:
            node = node[part]
        node[last] = value
    return {"distill": distill}


def test_runs_of_other_settings_get_their_own_tables(tmp_path, caplog):
    """Regression: a run with three distillations per method (`-S distill.repeats=3`) at a grid point the
    default run had filled took over its cells (newest wins), so Table 1 mixed one- and
    three-distillation cells. Now each set of settings has its own folder; cells that do not depend on
    the changed param (the full set does not depend on the distillation) are shared."""
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), _with())
    three = _row("b" * 40, "three", "2026-01-02T10:00:00", _all(0.6), _with(repeats=3))
    three_other_point = _row(
        "c" * 40, "three-rho1", "2026-01-02T11:00:00", _all(0.1), _with(repeats=3), bias_ratio=1.0
    )
    with caplog.at_level(logging.INFO, logger="biasdd.study"):
        written = report.write_report(_exp_show(three, three_other_point, baseline=base), tmp_path)
    assert sorted(written) == ["quick", "quick~distill.repeats=3"]
    main = _csv(tmp_path / "quick/table1_test_conflicting.csv")
    assert main["DC"]["CMNIST-DD rho=0.95"] == "50.00 +- 1.00"  # the default run's, not the newer run's
    assert main["DC"]["CMNIST-DD rho=1"] == ""
    assert main["Full set"]["CMNIST-DD rho=0.95"] == "53.00 +- 1.00"  # the same settings: the workspace's
    variant = _csv(tmp_path / "quick~distill.repeats=3/table1_test_conflicting.csv")
    assert variant["DC"]["CMNIST-DD rho=0.95"] == "60.00 +- 1.00"
    assert variant["DC"]["CMNIST-DD rho=1"] == "10.00 +- 1.00"
    assert variant["Full set"]["CMNIST-DD rho=0.95"] == "53.00 +- 1.00"  # shared with the reference
    title = (tmp_path / "quick~distill.repeats=3/table1_test_conflicting.md").read_text().splitlines()[0]
    assert "settings changed from quick/'s: distill.repeats=3" in title
    settings = json.loads((tmp_path / "quick~distill.repeats=3/settings.json").read_text())
    assert settings["changes_from_reference"] == {"distill.repeats": 3}
    assert settings["settings"]["distill.repeats"] == 3
    assert json.loads((tmp_path / "quick/settings.json").read_text())["settings"]["distill.repeats"] == 1
    overridden = [r.getMessage() for r in caplog.records if "different values" in r.getMessage()]
    assert len(overridden) == 1 and overridden[0].startswith("2 cell(s)")  # the full set's two splits only


def test_a_method_param_changes_only_that_methods_cells(tmp_path):
    """`-S distill.dc.lr_img=10`: DC's cells form a variant; the same run's DSA, DM and full-set cells
    were made with the reference's settings and fill the reference's tables."""
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), _with())
    probe = _row(
        "b" * 40, "lr10", "2026-01-02T10:00:00", _all(0.7), _with(**{"dc.lr_img": 10.0}), bias_ratio=0.8
    )
    written = report.write_report(_exp_show(probe, baseline=base), tmp_path)
    assert sorted(written) == ["quick", "quick~distill.dc.lr_img=10.0"]
    main = _csv(tmp_path / "quick/table1_test_conflicting.csv")
    assert main["DC"]["CMNIST-DD rho=0.8"] == ""
    assert main["DM"]["CMNIST-DD rho=0.8"] == "72.00 +- 1.00"  # the probe's DM: the reference's settings
    assert main["DC"]["CMNIST-DD rho=0.95"] == "50.00 +- 1.00"
    variant = _csv(tmp_path / "quick~distill.dc.lr_img=10.0/table1_test_conflicting.csv")
    assert variant["DC"]["CMNIST-DD rho=0.8"] == "70.00 +- 1.00"
    assert variant["DM"]["CMNIST-DD rho=0.8"] == "72.00 +- 1.00"
    assert variant["DC"]["CMNIST-DD rho=0.95"] == ""  # the reference's DC is not this variant's


def test_a_budget_only_experiments_ran_takes_the_repositorys_settings_as_reference(tmp_path):
    """Regression: for a budget no baseline ran (hour), the newest experiment's settings were the
    reference, so a newer run that changed one setting made the runs of the repository's own settings
    the variant (`hour~distill.dc.lr_img=30.0`)."""
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), _with())
    own = _row("b" * 40, "own", "2026-01-02T10:00:00", _all(0.6), _with(), budget="hour")
    newer = _row(
        "c" * 40, "newer", "2026-01-03T10:00:00", _all(0.7), _with(**{"dc.lr_img": 10.0}), budget="hour"
    )
    written = report.write_report(_exp_show(own, newer, baseline=base), tmp_path)
    assert sorted(written) == ["hour", "hour~distill.dc.lr_img=10.0", "quick"]
    assert _csv(tmp_path / "hour/table1_test_conflicting.csv")["DC"]["CMNIST-DD rho=0.95"] == "60.00 +- 1.00"
    variant = _csv(tmp_path / "hour~distill.dc.lr_img=10.0/table1_test_conflicting.csv")
    assert variant["DC"]["CMNIST-DD rho=0.95"] == "70.00 +- 1.00"


def test_a_null_param_and_an_absent_one_are_the_same_settings(tmp_path):
    """Regression: a key added to conf/ as null (the default: `distill.dm.repeats`) made every run of an
    older commit, which lacks the key, a variant (`quick~distill.dm.repeats=unset`) of the same settings."""
    base = _row("a" * 40, "master", "2026-01-02T10:00:00", _all(0.5), _with(**{"dm.repeats": None}))
    older = _row("b" * 40, "older", "2026-01-01T10:00:00", _all(0.2), _with(), bias_ratio=1.0)
    written = report.write_report(_exp_show(older, baseline=base), tmp_path)
    assert list(written) == ["quick"]
    assert _csv(tmp_path / "quick/table1_test_conflicting.csv")["DM"]["CMNIST-DD rho=1"] == "22.00 +- 1.00"
    own = _row("c" * 40, "own", "2026-01-03T10:00:00", _all(0.7), _with(**{"dm.repeats": 3}), bias_ratio=1.0)
    written = report.write_report(_exp_show(older, own, baseline=base), tmp_path / "b")
    assert sorted(written) == ["quick", "quick~distill.dm.repeats=3"]  # a value that is set still counts


def test_a_param_added_with_the_old_behaviour_is_set_in_older_runs():
    """Regression: `bias_model.grouping` (per_group: the code before the key existed) made every label-free
    cell of an older commit a variant, `quick~bias_model.grouping=unset`."""
    older, own = _with(), {**_with(), "bias_model": {"grouping": "per_group"}}
    assert cellmod.run_settings(older) == cellmod.run_settings(own)
    assert cellmod.run_settings({**_with(), "bias_model": {"grouping": "clustered"}}) != cellmod.run_settings(
        older
    )


def test_the_synchronized_learning_rate_splits_only_synchronized_cells():
    """`distill.<method>.lr_img_synchronized` is read under fairdd and inferred_fairdd only: a DC run of an
    older commit, which lacks the key, is the same settings for its other modes' cells, not for those."""
    older = cellmod.run_settings(_with())
    own = cellmod.run_settings(_with(**{"dc.lr_img_synchronized": 3.0}))
    for mode in vocab.DEBIAS_MODES:
        same = cellmod.cell_settings(older, "dc", "cmnist", mode) == cellmod.cell_settings(
            own, "dc", "cmnist", mode
        )
        assert same == (mode not in vocab.SYNCHRONIZED_MODES), mode
        assert cellmod.cell_settings(older, "dm", "cmnist", mode) == cellmod.cell_settings(
            own, "dm", "cmnist", mode
        )


def test_params_that_change_no_number_make_no_variant(tmp_path):
    """Which methods ran, the device, checkpoints, compile, whether the download may fetch (regression: a
    run from before `download.fetch` existed had tables of its own): one table (a DM-only run on a GPU
    included)."""
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), _with())
    gpu = {**_with(checkpoint_every=50), "device": "cuda", "methods": ["dm"], "compute": {"compile": False}}
    gpu["download"] = {"fetch": False}
    run = _row(
        "b" * 40, "dm-on-gpu", "2026-01-02T10:00:00", _all(0.2, names=["dm", "full"]), gpu, bias_ratio=1.0
    )
    written = report.write_report(_exp_show(run, baseline=base), tmp_path)
    assert list(written) == ["quick"]
    assert _csv(tmp_path / "quick/table1_test_conflicting.csv")["DM"]["CMNIST-DD rho=1"] == "20.00 +- 1.00"


def test_a_datasets_own_params_split_only_its_cells():
    """CMNIST-DD's colours feed CMNIST-DD's cells only, and a schedule only its dataset's method."""
    schedule = {"cmnist": {"dm": {"epochs": 300}}, "ccifar10": {"dm": {"epochs": 300}, "dc": {"epochs": 150}}}
    params = {"cmnist": {"sigma": [0.05]}, "evaluate": {"synthetic": {"schedule": schedule}}}
    ref = cellmod.run_settings(params)
    other = {**ref, "cmnist.sigma": "[0.1]", "evaluate.synthetic.schedule.ccifar10.dc.epochs": "1000"}
    assert cellmod.cell_settings(other, "dm", "ccifar10") == cellmod.cell_settings(ref, "dm", "ccifar10")
    assert cellmod.cell_settings(other, "full", "ccifar10") == cellmod.cell_settings(ref, "full", "ccifar10")
    assert cellmod.cell_settings(other, "dm", "cmnist") != cellmod.cell_settings(ref, "dm", "cmnist")
    assert cellmod.cell_settings(other, "dc", "ccifar10") != cellmod.cell_settings(ref, "dc", "ccifar10")


def test_long_changes_get_a_short_folder_name():
    ref = cellmod.Variant("quick", (("distill.dc.lr_img", "30.0"),))
    long = cellmod.Variant("quick", (), changes=tuple((f"distill.dc.key{i}", "1") for i in range(9)))
    assert ref.folder == "quick" and re.fullmatch(r"quick~v[0-9a-f]{8}", long.folder)
    assert long.note().endswith("and 5 more (settings.json)")


def test_cell_settings_are_what_dvc_yaml_feeds_the_cell():
    """A cell's settings are exactly the params of the stages upstream of its metrics file in dvc.yaml,
    less the grid point and cellmod.NEUTRAL: a param added to a stage counts without anyone listing it."""
    from .test_dag import PARAMS, STAGES

    definitions = {name: definition for name, _, definition in STAGES}
    made_by = {}
    for name, definition in definitions.items():
        for out in [*definition.get("outs", []), *definition.get("metrics", [])]:
            made_by[out if isinstance(out, str) else next(iter(out))] = name

    def upstream_params(stage: str) -> set[str]:
        params, todo, seen = set(), [stage], set()
        while todo:
            name = todo.pop()
            if name.startswith("experts@") and name.split("@")[1] not in vocab.EXPERT_METHODS:
                continue  # a method without experts: experts@<method>'s output depends on no param
            if name not in seen:
                seen.add(name)
                params |= set(definitions[name].get("params", []))
                todo += [made_by[dep] for dep in definitions[name].get("deps", []) if dep in made_by]
        return params

    settings = cellmod.run_settings(PARAMS)
    assert not any(cellmod._under(k, cellmod.NEUTRAL) for k in settings)
    # fed to every distillation, read under their modes only
    debias_keys = ("debias", "bias_model", *(f"distill.{m}.{cellmod.SYNCHRONIZED_LR}" for m in vocab.METHODS))
    assert "distill.dc.lr_img_synchronized" in settings  # set by the quick budget, so the test sees it
    for stage, name in [("evaluate_full", "full"), *((f"evaluate@{m}", m) for m in vocab.METHODS)]:
        fed = {k for k in settings if cellmod._under(k, upstream_params(stage))}
        plain = {k for k in fed if not cellmod._under(k, debias_keys)}
        assert set(cellmod.relevant(settings, name, PARAMS["dataset"])) == plain, stage
        if name != "full":
            for mode in vocab.DEBIAS_MODES[1:]:
                expected = fed - {"debias.mode"}
                if mode not in vocab.LABEL_FREE_MODES:
                    expected = {k for k in expected if not cellmod._under(k, ("bias_model",))}
                if mode not in vocab.SYNCHRONIZED_MODES:
                    expected = {k for k in expected if not k.endswith(f".{cellmod.SYNCHRONIZED_LR}")}
                assert set(cellmod.relevant(settings, name, PARAMS["dataset"], mode)) == expected, (
                    stage,
                    mode,
                )


def test_stale_workspace_still_names_the_reference_settings(tmp_path):
    """The workspace's metrics are left out when stale, but its params name the repository's settings."""
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), _with(repeats=3))
    stale = _row("workspace", None, None, _all(0.9), _with())
    rows = experiments.without_workspace(_exp_show(workspace=stale, baseline=base))
    written = report.write_report(rows, tmp_path)
    assert sorted(written) == ["quick", "quick~distill.repeats=3"]
    main = _csv(tmp_path / "quick/table1_test_conflicting.csv")  # the workspace's settings: one distillation
    assert (
        main["DC"]["CMNIST-DD rho=0.95"] == "" and main["Full set"]["CMNIST-DD rho=0.95"] == "53.00 +- 1.00"
    )
    variant = _csv(tmp_path / "quick~distill.repeats=3/table1_test_conflicting.csv")
    assert variant["DC"]["CMNIST-DD rho=0.95"] == "50.00 +- 1.00"
    assert rows[0]["data"]["params"] and not rows[0]["data"]["metrics"]


def _commit_with_lock(repo: Path, lr_img_run: float) -> str:
    """A git commit holding a dvc.yaml and the dvc.lock of a run whose DC distillation used `lr_img_run`."""
    repo.mkdir(exist_ok=True)
    dvc_yaml = {
        "stages": {
            name: {"foreach": "${methods}", "do": {"cmd": f"python stages/{name}.py --method ${{item}}"}}
            for name in ("distill", "evaluate")
        }
    }
    evaluate = {
        f"evaluate@{m}": {
            "cmd": "...",
            "deps": [{"path": f"data/synthetic/{m}.h5", "md5": "0"}],
            "params": {"params.yaml": {"seed": 0}},
            "outs": [{"path": f"metrics/{split}/{m}.json", "md5": "0"} for split in vocab.TEST_SPLITS],
        }
        for m in ("dc", "dm")
    }
    lock = {
        "schema": "2.0",
        "stages": {
            "distill@dc": {
                "cmd": "...",
                "params": {"params.yaml": {"distill.dc": {"lr_img": lr_img_run}}},
                "outs": [{"path": "data/synthetic/dc.h5", "md5": "0"}],
            },
            "distill@dm": {
                "cmd": "...",
                "params": {"params.yaml": {"distill.dm": {"iterations": 300}}},
                "outs": [{"path": "data/synthetic/dm.h5", "md5": "0"}],
            },
            **evaluate,
            # an entry of a stage dvc.yaml no longer defines (DVC leaves them in dvc.lock): not read
            "evaluate@full": {
                "cmd": "...",
                "params": {"params.yaml": {"gone": 1}},
                "outs": evaluate["evaluate@dm"]["outs"],
            },
        },
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    if not (repo / ".git").exists():
        run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", f"lock of lr_img {lr_img_run}")
    return run(repo, "git", "rev-parse", "HEAD").strip()


def test_commit_metrics_made_with_other_params_are_not_reported(tmp_path, caplog):
    """Regression: a commit of this repository set DC's image learning rate to 10 and was committed with
    the metrics of the run before (rate 0.1, from noise); `--all-commits` tabled those as rate 10's. A
    commit's metrics files whose stage (or one upstream) dvc.lock records with other param values than
    the commit's params.yaml are left out; its other metrics, and experiments, stay."""
    repo = tmp_path / "repo"
    params = {
        "methods": ["dc", "dm"],
        "seed": 0,
        "distill": {"dc": {"lr_img": 10.0}, "dm": {"iterations": 300}},
    }
    metrics = _all(0.5, names=["dc", "dm"])
    stale_rev = _commit_with_lock(repo, lr_img_run=0.1)
    fresh_rev = _commit_with_lock(repo, lr_img_run=10.0)
    experiment = _row("e" * 40, "exp", "2026-01-03T00:00:00", metrics, params)  # DVC's own run: kept
    stale = _row(stale_rev, None, "2026-01-01T00:00:00", metrics, params)
    stale["experiments"] = [_exp(experiment)]
    fresh = _row(fresh_rev, None, "2026-01-02T00:00:00", metrics, params)
    with caplog.at_level(logging.INFO, logger="biasdd.study"):
        rows = experiments.without_stale_commit_metrics([fresh, stale], repo)
    assert sorted(rows[0]["data"]["metrics"]) == sorted(metrics)
    kept = sorted(rows[1]["data"]["metrics"])
    assert kept == sorted(p for p in metrics if "/dc.json" not in p or p.startswith("metrics/bias/"))
    assert rows[1]["experiments"][0]["revs"][0]["data"]["metrics"] == metrics
    assert f"not reported: {stale_rev[:7]}" in caplog.text
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert experiments.stale_metrics(lock, yaml.safe_load((repo / "dvc.yaml").read_text()), params) == {}


def test_commits_that_cannot_be_checked_keep_their_metrics(monkeypatch, tmp_path):
    """No git (a `dvc init --no-scm` repository) or an unreadable dvc.lock: nothing to compare, nothing left
    out, no traceback."""
    repo = tmp_path / "repo"
    rev = _commit_with_lock(repo, lr_img_run=0.1)
    (repo / "dvc.lock").write_text("stages: [unclosed")
    run(repo, "git", "commit", "-qam", "a broken lock")
    broken = run(repo, "git", "rev-parse", "HEAD").strip()
    params = {"methods": ["dc", "dm"], "distill": {"dc": {"lr_img": 10.0}}}
    rows = [
        _row(r, None, "2026-01-01T00:00:00", _all(0.5, names=["dc", "dm"]), params) for r in (broken, rev)
    ]
    checked = experiments.without_stale_commit_metrics(rows, repo)
    assert checked[0] == rows[0]  # the broken lock: kept
    (repo / "dvc.lock").write_text("stages: {distill@dc: {outs: [no-path-key]}}")  # valid YAML, odd layout
    run(repo, "git", "commit", "-qam", "an odd lock")
    odd = _row(run(repo, "git", "rev-parse", "HEAD").strip(), None, None, rows[0]["data"]["metrics"], params)
    assert experiments.without_stale_commit_metrics([odd], repo) == [odd]
    assert "metrics/test_conflicting/dc.json" not in checked[1]["data"]["metrics"]  # the other is checked

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(experiments.subprocess, "run", no_git)
    assert experiments.without_stale_commit_metrics(rows, repo) == rows


def test_no_metrics_anywhere(tmp_path, caplog):
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", {})
    with caplog.at_level(logging.WARNING):
        assert report.write_report(_exp_show(baseline=base), tmp_path) == {}
    assert "nothing to report" in caplog.text


def test_cli_reads_saved_json(tmp_path):
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(_exp_show()))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "biasdd.study.report",
            "--exp-show-json",
            str(saved),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Table 1" in out.stdout and (tmp_path / "r/quick/table1_test_conflicting.md").exists()


def test_cli_bad_input_is_one_line(monkeypatch, tmp_path, caplog):
    """A missing or corrupt saved JSON, or `dvc exp show` failing (not a DVC repository): one error line
    naming the input, exit status 2, no traceback and nothing written."""
    (tmp_path / "bad.json").write_text("{")

    def no_repo(cmd, repo):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: you are not inside of a DVC repository"
        )

    monkeypatch.setattr(experiments, "run_tool", no_repo)
    cases = [
        (["--exp-show-json", str(tmp_path / "absent.json")], "absent.json: [Errno 2]"),
        (["--exp-show-json", str(tmp_path / "bad.json")], "bad.json: Expecting property name"),
        (["--repo", str(tmp_path)], "not inside of a DVC repository (valid: --repo a DVC repository"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert report.main([*argv, "--out", str(tmp_path / "out")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_grid_cells_and_dry_run(capsys):
    cells = grid.grid_cells(severity_sweep=True)
    table1 = [c for c in cells if c.methods is None]
    sweep = [c for c in cells if c.methods is not None]
    assert len(table1) == 2 * 6 and {c.severity for c in table1} == {4}
    # DM at rho 0 and 1, severities 1-3 (severity 4 comes from Table 1's experiments)
    assert len(sweep) == 2 * 2 * 3 and {c.methods for c in sweep} == {("dm",)}
    assert sweep[0].command()[-2:] == ["-S", "methods=[dm]"] and sweep[0].name.startswith("cmnist-dm-rho0-")
    assert len({c.name for c in cells}) == len(cells)
    assert (
        grid.main(["queue", "--datasets", "cmnist", "--ratios", "0", "1", "--dry-run", "--start", "-j", "2"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "dvc exp run --queue -n cmnist-rho0-sev4-quick -S dataset=cmnist -S bias_ratio=0 -S severity=4 "
        "-S budget=quick",
        "dvc exp run --queue -n cmnist-rho1-sev4-quick -S dataset=cmnist -S bias_ratio=1 -S severity=4 "
        "-S budget=quick",
        "dvc queue start -j 2",
    ]
    with pytest.raises(ValueError, match="valid are"):
        grid.grid_cells(ratios=[1.5])


def test_grid_set_queues_a_variant_of_every_cell(capsys):
    """`--set KEY=VALUE` goes to every experiment as `-S`, and into its name (names stay unique)."""
    assert grid.main(["queue", "--datasets", "cmnist", "--ratios", "0.95", "--set", "distill.repeats=3",
                      "--severity-sweep", "--dry-run"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "dvc exp run --queue -n cmnist-rho0.95-sev4-quick-distill.repeats-3 -S dataset=cmnist "
        "-S bias_ratio=0.95 -S severity=4 -S budget=quick -S distill.repeats=3"
    )
    assert all(line.endswith("-S distill.repeats=3") for line in lines) and len(lines) == 1 + 2 * 4
    assert len({line.split()[5] for line in lines}) == len(lines)


@pytest.mark.parametrize(
    ("value", "message"),
    [("distill.repeats", "valid is KEY=VALUE"), ("bias_ratio=0.5", "the grid sets dataset, bias_ratio")],
)
def test_grid_set_rejects_bad_overrides(capsys, value, message):
    with pytest.raises(SystemExit) as exit_:
        grid.main(["queue", "--set", value, "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and value in err and "Traceback" not in err


def test_grid_outside_a_dvc_repository(monkeypatch, tmp_path, caplog, capsys):
    """`wait` ended in a traceback, and `queue` printed its next steps with nothing queued."""

    def no_repo(cmd, repo):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: you are not inside of a DVC repository"
        )

    monkeypatch.setattr(grid, "run_tool", no_repo)
    assert grid.main(["wait", "--repo", str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["dvc queue status failed: ERROR: you are not inside of a DVC repository"]
    assert (
        grid.main(["queue", "--datasets", "cmnist", "--ratios", "0.1", "--start", "--repo", str(tmp_path)])
        == 1
    )
    assert "could not queue cmnist-rho0.1-sev4-quick" in caplog.text
    assert capsys.readouterr().out == ""  # no "next:" steps, no queue started


def test_start_queue_returns_while_the_workers_run(monkeypatch, tmp_path):
    """`dvc queue start` exits at once but leaves workers that inherit its stdout; read through a pipe,
    its output only ended with the last worker, so starting the queue waited for the whole queue (CI:
    "timed out after 300 seconds"). The stand-in dvc below leaves such a worker behind."""
    fake = tmp_path / "dvc"
    fake.write_text(
        "#!/bin/sh\n"
        'sleep 120 &\necho $! > "$(dirname "$0")/worker.pid"\n'
        "echo \"Started '2' new experiments task queue workers.\"\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(tools, "dvc_executable", lambda: str(fake))
    result = grid.start_queue(tmp_path, 2)
    worker = int((tmp_path / "worker.pid").read_text())
    try:
        os.kill(worker, 0)  # raises if the worker has exited: start_queue returned while it still runs
        assert result.returncode == 0 and "Started '2' new" in result.stdout
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_dvc_subprocesses_find_this_environments_tools(monkeypatch, tmp_path):
    """From an un-activated venv, `dvc queue start` spawned its worker as `dvc` from PATH, found none
    and left the queue without a worker: grid's subprocesses put this environment's bin first."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = tools.run_tool(["sh", "-c", "command -v dvc; command -v python"], tmp_path).stdout.split()
    bin_dir = Path(sys.executable).parent
    assert found == [str(bin_dir / "dvc"), str(bin_dir / "python")]


def test_queue_run_and_report_tiny(tmp_path):
    """Two real DM-only experiments (Table 2 cells) through DVC's queue, then the report (~2-3 min). The
    second is a variant (`biasdd-grid queue --set distill.repeats=1`; the tiny budget distils twice): its
    DM cell is tabled on its own, its full set (no distillation in it) with the reference's too."""
    repo = make_repo(tmp_path)
    cells = [
        grid.GridCell("cmnist", 1.0, 1, "quick", methods=grid.SWEEP_METHODS),
        grid.GridCell("cmnist", 1.0, 2, "quick", methods=grid.SWEEP_METHODS, extra=("distill.repeats=1",)),
    ]
    assert grid.queue(cells, repo) == 0
    assert grid.queue_counts(repo) == {"Queued": 2}
    run(repo, "dvc", "queue", "start", "-j", "1")
    counts = grid.wait(repo, poll_s=5, timeout_s=600)
    assert counts == {"Success": 2}, run(repo, "dvc", "queue", "logs", cells[0].name)
    run(repo, "dvc", "queue", "stop")  # workers exit on an empty queue; make sure
    assert not experiments.workspace_is_current(
        repo
    )  # the workspace itself never ran: `dvc status` lists stages
    written = report.write_report(experiments.exp_show_json(repo), tmp_path / "reports")
    assert list(written) == ["quick", "quick~distill.repeats=1"]
    row = _csv(tmp_path / "reports/quick/table2_test_conflicting.csv")["CMNIST-DD rho=1"]
    assert row["severity 1"] and not row["severity 2"] and not row["severity 3"] and not row["severity 4"]
    variant = tmp_path / "reports/quick~distill.repeats=1"
    row = _csv(variant / "table2_test_conflicting.csv")["CMNIST-DD rho=1"]
    assert row["severity 2"] and not row["severity 1"]
    assert json.loads((variant / "settings.json").read_text())["changes_from_reference"] == {
        "distill.repeats": 1
    }
    full = {
        (r[3], r[4]) for r in csv.reader(io.StringIO((variant / "cells.csv").read_text())) if r[4] == "full"
    }
    assert full == {("1", "full"), ("2", "full")}  # both experiments' full sets: the same settings


def _grid(values: dict[tuple[float, str], tuple[float, float]]) -> dict[tuple, cellmod.Cell]:
    """Table 1 cells of CMNIST-DD (quick, severity 4, test_conflicting): {(ratio, name): (mean %, std %)}."""
    cells = {}
    for (ratio, name), (mean, std) in values.items():
        cell = cellmod.Cell(
            "quick", "cmnist", ratio, 4, name, "test_conflicting", mean / 100, std / 100, 3, "exp", None
        )
        cells[cell.position] = cell
    return cells


# The quick budget's Table 1 as docs/results.md reports it (the cells the four findings rest on).
QUICK_TABLE1 = {
    (0.1, "dc"): (88.97, 1.06), (0.1, "dsa"): (91.86, 0.75), (0.1, "dm"): (92.38, 0.61),
    (0.1, "full"): (98.70, 0.0), (0.95, "dc"): (17.03, 1.85), (0.95, "dsa"): (14.20, 2.17),
    (0.95, "dm"): (13.40, 1.56), (0.95, "full"): (87.53, 0.0), (1.0, "dc"): (8.58, 0.26),
    (1.0, "dsa"): (11.48, 1.58), (1.0, "dm"): (9.54, 0.65), (1.0, "full"): (5.02, 0.0),
}  # fmt: skip


def test_findings_state_each_margin_and_flag_those_inside_the_spread():
    found = findings.findings(_grid(QUICK_TABLE1), "quick")
    assert [f.verdict for f in found] == [
        "reproduced: by 2.53 points",
        "reproduced: by 0.27 points, less than the spread (1.06)",
        "reproduced: by 0.80 points, less than the spread (2.17)",
        "reproduced: by 3.52 points",
    ]
    assert found[1].values.startswith("DC 88.97 ± 1.06, DSA 91.86 ± 0.75")


def test_findings_say_what_misses_and_what_was_not_measured(tmp_path):
    one_dc = {**QUICK_TABLE1, (0.1, "dc"): (87.85, 0.61)}  # the one-distillation default's DC
    del one_dc[(1.0, "full")]
    found = findings.findings(_grid(one_dc), "quick")
    assert found[1].verdict == "not reproduced: misses by 0.85 points"
    assert found[3].verdict == "not measured (a cell is missing)" and "Full set -" in found[3].values
    dm_above = {**QUICK_TABLE1, (0.95, "dm"): (15.00, 1.0)}
    assert findings.findings(_grid(dm_above), "quick")[2].verdict == "not reproduced: misses by 0.80 points"
    text = findings.findings_markdown(found, "quick")
    assert "budget: quick (REDUCED budget" in text and "| rho 0.1: every method within 10 points" in text


def test_report_writes_the_findings_beside_table_1(tmp_path):
    base = _row("a" * 40, "master", "2026-01-01T10:00:00", _all(0.5), _with())
    written = report.write_report(_exp_show(baseline=base), tmp_path)
    path = tmp_path / "quick/findings_cmnist.md"
    assert path in written["quick"]
    text = path.read_text()
    # the rows' numbers (_all: DC 50, DSA 51, DM 52, full 53 at rho 0.95 only): DM is not below DSA
    assert "| DC 50.00 ± 1.00, DSA 51.00 ± 1.00, DM 52.00 ± 1.00 |" in text
    assert "not reproduced: misses by 2.00 points" in text
    assert "rho 0.1: every method within 10 points of the full set" in text and "not measured" in text


def test_figure2_shows_a_method_s_synthetic_sets_at_rho_0_and_1(tmp_path, monkeypatch, caplog):
    """Figure 2 reads each run's synthetic set back through DVC (here a stand-in), one panel per ratio;
    a set DVC cannot read is skipped with a warning, never a failed report."""
    from biasdd.datasets import SyntheticDataset

    read: list[tuple[str, str | None]] = []

    class Stub:
        images = torch.zeros(20, 3, 8, 8)
        targets = torch.arange(10).repeat_interleave(2)
        mean, std = np.zeros(3), np.ones(3)

    def from_dvc(path: str, repeat: int = 0, repo: str | None = None, rev: str | None = None):
        read.append((path, rev))
        if "dc" in path:
            raise FileNotFoundError("not in the cache")
        return Stub()

    monkeypatch.setattr(SyntheticDataset, "from_dvc", staticmethod(from_dvc))
    rows = [
        _row("0" * 40, "rho0", "2026-01-02T10:00:00", _all(0.8), bias_ratio=0.0),
        _row("1" * 40, "rho1", "2026-01-02T11:00:00", _all(0.1), bias_ratio=1.0),
    ]
    with caplog.at_level(logging.WARNING, logger="biasdd.study"):
        written = report.write_report(_exp_show(*rows), tmp_path / "r", repo=tmp_path)
    figures = sorted(p.name for p in written["quick"] if p.name.startswith("figure2"))
    assert figures == ["figure2_cmnist_dm.png", "figure2_cmnist_dsa.png"]
    assert (tmp_path / "r/quick/figure2_cmnist_dm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("data/synthetic/dm.h5", "0" * 40) in read and ("data/synthetic/dm.h5", "1" * 40) in read
    assert "figure 2: dc at rho 0 unreadable" in caplog.text


def test_grid_methods_choose_table1_s_methods():
    cells = grid.grid_cells(
        datasets=["cmnist"], ratios=[0.95], methods=["mtt"] if "mtt" in vocab.METHODS else ["dm"]
    )
    assert len(cells) == 1 and cells[0].methods is not None
    assert f"methods=[{cells[0].methods[0]}]" in cells[0].overrides()
    with pytest.raises(ValueError, match="--methods 'xyz': valid are"):
        grid.grid_cells(methods=["xyz"])
    with pytest.raises(ValueError, match="--set 'methods=\\[dm\\]': the grid sets"):
        grid.grid_cells(extra=["methods=[dm]"])


def test_figure2_title_is_wrapped_to_the_figure_width(tmp_path, monkeypatch):
    """Regression: Figure 2's one-line title (method, dataset, budget note) ran off both sides of it."""
    from biasdd import figures

    titles = []
    monkeypatch.setattr(figures.plt.Figure, "suptitle", lambda self, text, **kw: titles.append(text))
    images, labels = np.random.rand(20, 3, 8, 8).astype("float32"), np.repeat(np.arange(10), 2)
    panel = (images, labels, np.zeros(3), np.ones(3))
    long = "DM synthetic images, CMNIST-DD severity 4, rho 0 (anti-biased) and 1 (fully biased); " + "x " * 40
    figures.synthetic_by_ratio({"rho = 0": panel, "rho = 1": panel}, 2, tmp_path / "f.png", long)
    (title,) = titles
    width_chars = int(
        2 * 3 * 0.55 * 13
    )  # two panels of 2 + 1 columns, 0.55 inch each, ~13 characters an inch
    assert "\n" in title and max(len(line) for line in title.splitlines()) <= max(40, width_chars)
