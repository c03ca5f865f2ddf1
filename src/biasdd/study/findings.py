"""Claims checked on a variant's cells, each with its margin: the study's four CMNIST-DD findings
(docs/protocol.md §8) on Table 1 (`findings_cmnist.md`), and the debiasing targets (§9) on the debias
table (`findings_debias.md`).

Each claim holds or not, by how many points, and is flagged where that margin is smaller than the
spread of the cells it rests on (a seed can move it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from biasdd.study.cells import Cell
from biasdd.study.tables import _budget_title, _fmt_cell
from biasdd.vocab import (
    DEBIAS_MODES,
    LABEL_FREE_MODES,
    METHODS,
    NUM_CLASSES,
    ROW_TITLES,
    SPLIT_TITLES,
    STUDY_METHODS,
    TABLE1_SEVERITY,
)

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
    words: tuple[str, str] = ("reproduced", "not reproduced")  # (holds, does not hold)
    exact: bool = False  # a yes/no claim: no margin in points to show

    @property
    def verdict(self) -> str:
        if self.margin is None:
            return "not measured (a cell is missing)"
        if self.exact:
            return self.words[0] if self.margin >= 0 else self.words[1]
        if self.margin < 0:
            return f"{self.words[1]}: misses by {100 * -self.margin:.2f} points"
        thin = f", less than the spread ({100 * self.spread:.2f})" if self.margin < self.spread else ""
        return f"{self.words[0]}: by {100 * self.margin:.2f} points{thin}"


def findings(cells: Mapping[tuple, Cell], budget: str) -> list[Finding]:
    """The four findings of §8 CMNIST-DD's Table 1 on test_conflicting can show, each with its margin."""

    def get(ratio: float, name: str) -> Cell | None:
        return cells.get((budget, "cmnist", ratio, TABLE1_SEVERITY, name, "test_conflicting", "none"))

    def check(
        claim: str, ratio: float, names: Sequence[str], margin: Callable[[dict[str, float]], float]
    ) -> Finding:
        found = {n: get(ratio, n) for n in names}
        values = ", ".join(f"{ROW_TITLES[n]} {_fmt_cell(c, '±') or '-'}" for n, c in found.items())
        if any(c is None for c in found.values()):
            return Finding(claim, values, None, 0.0)
        spread = max(c.std for c in found.values() if c is not None)
        return Finding(claim, values, margin({n: c.mean for n, c in found.items() if c is not None}), spread)

    methods = list(STUDY_METHODS)
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


# --- the debiasing targets (docs/protocol.md §9), checked on a folder's debias table ---------------------

WITHIN = 0.01  # "within 1 point"
HOUR_FLOOR = 0.94  # the hour budget's target for DM's best label-free mode at rho 0.95
DEBIAS_SPLIT = "test_uniform"  # the debiasing literature's balanced test set
HOLDS = ("holds", "does not hold")


def _check(
    claim: str, found: Mapping[str, Cell | None], margin: Callable[[dict[str, float]], float]
) -> Finding:
    values = ", ".join(f"{name} {_fmt_cell(cell, '±') or '-'}" for name, cell in found.items())
    if not found or any(cell is None for cell in found.values()):
        return Finding(claim, values, None, 0.0, HOLDS)
    means = {name: cell.mean for name, cell in found.items() if cell is not None}
    spread = max(cell.std for cell in found.values() if cell is not None)
    return Finding(claim, values, margin(means), spread, HOLDS)


def _not_run(found: Mapping[str, Cell | None]) -> str:
    missing = [mode for mode, cell in found.items() if cell is None]
    return f" (not run: {', '.join(missing)})" if missing and len(missing) < len(found) else ""


def debias_findings(cells: Mapping[tuple, Cell], budget: str) -> list[Finding]:
    """The targets of docs/protocol.md §9 on CMNIST-DD, severity 4, test_uniform, for every method with a
    debiased cell: at rho 0.95 the best label-free mode within 1 point of the method's own unbiased
    accuracy (`none` at rho 0.1) and no more than 1 point below FairDD; at rho 0.1 and 0 no mode more
    than 1 point below `none`; at rho 1.0 every mode ran; at the hour budget DM's best label-free mode
    at rho 0.95 at least 94%."""

    def get(ratio: float, method: str, mode: str) -> Cell | None:
        return cells.get((budget, "cmnist", ratio, TABLE1_SEVERITY, method, DEBIAS_SPLIT, mode))

    debiased = [m for m in METHODS if any(c.method == m and c.mode != "none" for c in cells.values())]
    out: list[Finding] = []
    for method in debiased:
        title = ROW_TITLES[method]
        free = {mode: get(0.95, method, mode) for mode in LABEL_FREE_MODES}
        ran = {mode: cell for mode, cell in free.items() if cell is not None}
        best = max(ran, key=lambda mode: ran[mode].mean) if ran else LABEL_FREE_MODES[0]
        best_name = f"{best} at rho 0.95"
        out.append(
            _check(
                f"{title}: the best label-free mode at rho 0.95 within 1 point of {title} on unbiased data "
                "(none at rho 0.1)",
                {best_name: ran.get(best), "none at rho 0.1": get(0.1, method, "none")},
                lambda v, b=best_name: v[b] - (v["none at rho 0.1"] - WITHIN),
            )
        )
        out.append(
            _check(
                f"{title}: the best label-free mode at rho 0.95 no more than 1 point below FairDD (labels)",
                {best_name: ran.get(best), "fairdd at rho 0.95": get(0.95, method, "fairdd")},
                lambda v, b=best_name: v[b] - (v["fairdd at rho 0.95"] - WITHIN),
            )
        )
        for ratio in (0.1, 0.0):
            found = {mode: get(ratio, method, mode) for mode in DEBIAS_MODES}
            run = {mode: cell for mode, cell in found.items() if cell is not None or mode == "none"}
            if len(run) == 1:  # no debiased cell at this ratio: nothing to compare
                run = found
            out.append(
                _check(
                    f"{title} at rho {ratio:g}: no mode more than 1 point below none{_not_run(found)}",
                    run,
                    lambda v: min(v[m] for m in v if m != "none") - (v["none"] - WITHIN),
                )
            )
        at_one = {mode: get(1.0, method, mode) for mode in DEBIAS_MODES}
        values = ", ".join(f"{mode} {_fmt_cell(cell, '±') or '-'}" for mode, cell in at_one.items())
        ran_all = Finding(
            f"{title} at rho 1.0 (no bias-conflicting sample): every mode runs{_not_run(at_one)}",
            values,
            None if all(at_one[mode] is None for mode in DEBIAS_MODES[1:]) else 0.0,
            0.0,
            ("holds for every mode run", ""),
            exact=True,
        )
        out.append(ran_all)
    if budget == "hour" and "dm" in debiased:
        free = {mode: get(0.95, "dm", mode) for mode in LABEL_FREE_MODES}
        ran = {mode: cell for mode, cell in free.items() if cell is not None}
        best = max(ran, key=lambda mode: ran[mode].mean) if ran else LABEL_FREE_MODES[0]
        out.append(
            _check(
                f"DM at rho 0.95, hour budget: the best label-free mode at least {100 * HOUR_FLOOR:.0f}%",
                {f"{best} at rho 0.95": ran.get(best)},
                lambda v: next(iter(v.values())) - HOUR_FLOOR,
            )
        )
    return out


def debias_findings_markdown(
    found: Sequence[Finding], budget: str, variant: str = "", over: str = "the networks"
) -> str:
    """`over`: what the cells' std is over (the evaluation networks; the seeds for pooled cells)."""
    title = (
        f"**Debiased distillation on CMNIST-DD (docs/protocol.md §9), severity {TABLE1_SEVERITY}, "
        f"{SPLIT_TITLES[DEBIAS_SPLIT]}; {_budget_title(budget, variant)}**"
    )
    lines = [title, "", "| claim | cells (%) | |", "|---|---|---|"]
    lines += [f"| {f.claim} | {f.values} | {f.verdict} |" for f in found]
    note = (
        "Label-free modes: " + ", ".join(LABEL_FREE_MODES) + ". A margin smaller than the spread (the "
        f"largest std over {over} of the cells it rests on) is one a seed can move."
    )
    return "\n".join([*lines, "", note]) + "\n"
