"""Stage `plot`: the study's figures (PNG) and the series `dvc plots` compares (CSV), all offline.

    python stages/plot.py --params params.yaml --data data/biased.h5 --synthetic-dir data/synthetic \
        --details-dir metrics/details --figures plots/figures --series plots

Reads the distilled sets and evaluation results of the methods in `methods` (plus the full set).
Cost: a few seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd.cli import run_stage, setup_logging
from biasdd.params import load_params
from biasdd.pipeline import plot


def configure(params: Mapping[str, Any], item: str | None = None) -> tuple[plot.PlotConfig, list[str], str]:
    """Every param this stage reads, checked: (plot section, methods, budget)."""
    return plot.configure(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--synthetic-dir", required=True, type=Path)
    parser.add_argument("--details-dir", required=True, type=Path)
    parser.add_argument("--figures", required=True, type=Path)
    parser.add_argument("--series", required=True, type=Path)
    args = parser.parse_args()
    setup_logging()
    cfg, methods, budget = configure(load_params(args.params))
    plot.run(cfg, methods, budget, args.data, args.synthetic_dir, args.details_dir, args.figures, args.series)


if __name__ == "__main__":
    run_stage(main, "plot")
