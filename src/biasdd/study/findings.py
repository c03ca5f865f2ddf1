"""The study's four CMNIST-DD findings (docs/protocol.md §8), checked on a variant's Table 1.

Each finding is reproduced or not, by how many points, and flagged where that margin is smaller than
the spread of the cells it rests on (a seed can move it). Written as `findings_cmnist.md`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from biasdd.study.cells import Cell
from biasdd.study.tables import _budget_title, _fmt_cell
from biasdd.vocab import NUM_CLASSES, ROW_TITLES, SPLIT_TITLES, STUDY_METHODS, TABLE1_SEVERITY

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
        values = ", ".join(f"{ROW_TITLES[n]} {_fmt_cell(c, '±') or '-'}" for n, c in found.items())
        if any(c is None for c in found.values()):
            return Finding(claim, values, None, 0.0)
        spread = max(c.std for c in found.values() if c is not None)
        return Finding(claim, values, margin({n: c.mean for n, c in found.items() if c is not None}), spread)

    methods = list(STUDY_METHODS)  # the study's claims are about DC, DSA and DM (not MTT)
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
