"""The `plot` stage: the study's figures (PNG) and the series `dvc plots` compares (CSV), all offline.

`configure(params)` checks the `plot` section, `methods` and `budget`; `run` reads the biased set, the
distilled sets and evaluation results of the methods in `methods` (plus the full set) and writes Figure
1 (`biased_samples.png`), `synthetic_<method>.png`, `distill_loss.png`, `accuracy.png`, and
`accuracy_<split>.csv` and `summary.json`. The drawing is `biasdd.figures`'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from biasdd import artifacts, figures
from biasdd.config import Config, PositiveInt, check_value, from_dict, section
from biasdd.errors import ArtifactError
from biasdd.vocab import FULL, TEST_SPLITS


@dataclass(frozen=True)
class PlotConfig(Config):
    """The `plot` params section."""

    SECTION: ClassVar[str] = "plot"

    grid_ipc: PositiveInt  # synthetic images per class shown in the grids
    sample_rows_aligned: PositiveInt  # Figure 1: bias-aligned rows under the conflicting row


def configure(params: Mapping[str, Any]) -> tuple[PlotConfig, list[str], str]:
    """Every param this stage reads, checked: (plot section, methods, budget)."""
    cfg = from_dict(PlotConfig, section(params, "plot"), "plot")
    methods = list(check_value("methods", section(params, "methods"), tuple[str, ...]))
    budget = check_value("budget", section(params, "budget"), str)
    return cfg, methods, budget


def run(
    cfg: PlotConfig,
    methods: Sequence[str],
    budget: str,
    data_path: Path,
    synthetic_dir: Path,
    details_dir: Path,
    figures_dir: Path,
    series_dir: Path,
) -> None:
    """Every figure and series of the stage, from its inputs (checked first: one line names a missing one)."""
    artifacts.check_artifact(data_path, "biased")
    for method in methods:
        artifacts.check_artifact(synthetic_dir / f"{method}.h5", "synthetic")
    attrs = artifacts.read_attrs(data_path, kind="biased")
    label = (
        f"{attrs['dataset']}, bias ratio {attrs['bias_ratio']}, severity {attrs['severity']}, budget {budget}"
    )

    train = artifacts.read_h5(data_path, "train", ("images", "labels", "attributes"), kind="biased")
    figures.sample_grid(
        train["images"],
        train["labels"],
        train["attributes"],
        cfg.sample_rows_aligned,
        figures_dir / "biased_samples.png",
        f"biased training set ({label})",
    )
    curves = {}
    for method in methods:
        path = synthetic_dir / f"{method}.h5"
        norm = artifacts.read_h5(path, "normalisation", kind="synthetic")
        first = artifacts.read_h5(path, "repeat_0", kind="synthetic")
        curves[method] = first["loss"]
        figures.synthetic_grid(
            first["images"],
            first["labels"],
            norm["mean"],
            norm["std"],
            cfg.grid_ipc,
            figures_dir / f"synthetic_{method}.png",
            f"{method.upper()} synthetic set ({label})",
        )
    figures.loss_figure(curves, figures_dir / "distill_loss.png", f"distillation loss ({label})")

    results = {}
    for name in [FULL, *methods]:
        path = details_dir / f"{name}.json"
        if not path.exists():
            stage = "evaluate_full" if name == FULL else f"evaluate@{name}"
            raise ArtifactError(f"{path}: no such file; rebuild it with `dvc repro {stage}`")
        results[name] = json.loads(path.read_text())
    rows = accuracy_rows(results)
    for split in TEST_SPLITS:
        write_csv(series_dir / f"accuracy_{split}.csv", [r for r in rows if r["split"] == split])
    title = f"accuracy, mean +- std over repeats ({label})"
    figures.accuracy_figure(results, figures_dir / "accuracy.png", title)
    artifacts.write_json(series_dir / "summary.json", {"label": label, "rows": rows})


def accuracy_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (name, split): the series behind the accuracy figure and `dvc plots`."""
    rows = []
    for name, m in metrics.items():
        for split in TEST_SPLITS:
            s = m[split]
            rows.append(
                {
                    "name": name,
                    "split": split,
                    "accuracy": _pct(s["accuracy"]["mean"]),
                    "accuracy_std": _pct(s["accuracy"]["std"]),
                    "aligned_accuracy": _pct(s["aligned_accuracy"]["mean"]),
                    "conflicting_accuracy": _pct(s["conflicting_accuracy"]["mean"]),
                    "worst_group_accuracy": _pct(s["worst_group_accuracy"]["mean"]),
                    "n_repeats": m.get("n_repeats"),
                    "budget": m.get("budget"),
                }
            )
    return rows


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100.0 * value, 4)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """`rows` as CSV (the columns of the first row), written atomically; an empty file for no rows."""
    if not rows:
        artifacts.write_text(path, "")
        return
    keys = list(rows[0])
    lines = [",".join(keys)]
    lines += [",".join("" if r[k] is None else str(r[k]) for k in keys) for r in rows]
    artifacts.write_text(path, "\n".join(lines) + "\n")
