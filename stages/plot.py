"""Stage `plot`: the study's figures (PNG) and the series `dvc plots` compares (CSV), all offline.

    python stages/plot.py --params params.yaml --data data/biased.h5 --synthetic-dir data/synthetic \
        --details-dir metrics/details --figures plots/figures --series plots

Reads the distilled sets and evaluation results of the methods in `methods` (plus the full set).
Writes `<figures>/biased_samples.png` (Figure 1), `<figures>/synthetic_<method>.png`,
`<figures>/distill_loss.png`, `<figures>/accuracy.png`, and `<series>/accuracy_<split>.csv` and
`<series>/summary.json`. Cost: a few seconds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from biasdd import io, plots
from biasdd.config import Config, PositiveInt, check_value, from_dict, load_params, section, setup_logging
from biasdd.errors import ArtifactError, run_stage


@dataclass(frozen=True)
class PlotConfig(Config):
    """The `plot` params section."""

    SECTION: ClassVar[str] = "plot"

    grid_ipc: PositiveInt  # synthetic images per class shown in the grids
    sample_rows_aligned: PositiveInt  # Figure 1: bias-aligned rows under the conflicting row


def configure(params: Mapping[str, Any], item: str | None = None) -> tuple[PlotConfig, list[str], str]:
    """Every param this stage reads, checked: (plot section, methods, budget)."""
    cfg = from_dict(PlotConfig, section(params, "plot"), "plot")
    methods = list(check_value("methods", section(params, "methods"), tuple[str, ...]))
    budget = check_value("budget", section(params, "budget"), str)
    return cfg, methods, budget


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
    io.check_artifact(args.data, "biased")
    for method in methods:
        io.check_artifact(args.synthetic_dir / f"{method}.h5", "synthetic")
    attrs = io.read_attrs(args.data, kind="biased")
    label = (
        f"{attrs['dataset']}, bias ratio {attrs['bias_ratio']}, severity {attrs['severity']}, budget {budget}"
    )

    train = io.read_h5(args.data, "train", ("images", "labels", "attributes"), kind="biased")
    plots.sample_grid(
        train["images"],
        train["labels"],
        train["attributes"],
        cfg.sample_rows_aligned,
        args.figures / "biased_samples.png",
        f"biased training set ({label})",
    )
    curves = {}
    for method in methods:
        path = args.synthetic_dir / f"{method}.h5"
        norm = io.read_h5(path, "normalisation", kind="synthetic")
        first = io.read_h5(path, "repeat_0", kind="synthetic")
        curves[method] = first["loss"]
        plots.synthetic_grid(
            first["images"],
            first["labels"],
            norm["mean"],
            norm["std"],
            cfg.grid_ipc,
            args.figures / f"synthetic_{method}.png",
            f"{method.upper()} synthetic set ({label})",
        )
    plots.loss_figure(curves, args.figures / "distill_loss.png", f"distillation loss ({label})")

    results = {}
    for name in ["full", *methods]:
        path = args.details_dir / f"{name}.json"
        if not path.exists():
            stage = "evaluate_full" if name == "full" else f"evaluate@{name}"
            raise ArtifactError(f"{path}: no such file; rebuild it with `dvc repro {stage}`")
        results[name] = json.loads(path.read_text())
    rows = plots.accuracy_rows(results)
    for split in plots.SPLITS:
        plots.write_csv(args.series / f"accuracy_{split}.csv", [r for r in rows if r["split"] == split])
    title = f"accuracy, mean +- std over repeats ({label})"
    plots.accuracy_figure(results, args.figures / "accuracy.png", title)
    io.write_json(args.series / "summary.json", {"label": label, "rows": rows})


if __name__ == "__main__":
    run_stage(main, "plot")
