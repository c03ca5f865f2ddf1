"""Stage `plot`: the study's figures (PNG) and the series `dvc plots` compares (CSV), all offline.

    python stages/plot.py --params params.yaml --data data/biased.h5 --synthetic-dir data/synthetic \
        --metrics-dir metrics --out plots

Cost: a few seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biasdd import io, plots
from biasdd.config import budget_of, load_params, section, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--synthetic-dir", required=True, type=Path)
    parser.add_argument("--metrics-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    setup_logging()
    params = load_params(args.params)
    cfg = section(params, "plot")
    grid_ipc, rows_aligned = cfg["grid_ipc"], cfg["sample_rows_aligned"]
    for key, value in (("plot.grid_ipc", grid_ipc), ("plot.sample_rows_aligned", rows_aligned)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}: {value!r} is not valid; expected an integer >= 1")
    methods = list(params["methods"])
    budget = budget_of(params)
    attrs = io.read_attrs(args.data)
    label = (
        f"{attrs['dataset']}, bias ratio {attrs['bias_ratio']}, severity {attrs['severity']}, budget {budget}"
    )

    train = io.read_h5(args.data, "train", ("images", "labels", "aligned"))
    plots.sample_grid(
        train["images"],
        train["labels"],
        train["aligned"],
        rows_aligned,
        args.out / "biased_samples.png",
        f"biased training set ({label})",
    )
    curves = {}
    for method in methods:
        path = args.synthetic_dir / f"{method}.h5"
        norm = io.read_h5(path, "normalisation")
        first = io.read_h5(path, "repeat_0")
        curves[method] = first["loss"]
        plots.synthetic_grid(
            first["images"],
            first["labels"],
            norm["mean"],
            norm["std"],
            grid_ipc,
            args.out / f"synthetic_{method}.png",
            f"{method.upper()} synthetic set ({label})",
        )
    plots.loss_figure(curves, args.out / "distill_loss.png", f"distillation loss ({label})")

    metrics = {}
    for name in ["full", *methods]:
        metrics[name] = json.loads((args.metrics_dir / f"{name}.json").read_text())
    rows = plots.accuracy_rows(metrics)
    for split in plots.SPLITS:
        plots.write_csv(args.out / f"accuracy_{split}.csv", [r for r in rows if r["split"] == split])
    plots.accuracy_figure(metrics, args.out / "accuracy.png", f"accuracy, mean +- std over repeats ({label})")
    io.write_json(args.out / "summary.json", {"label": label, "rows": rows})


if __name__ == "__main__":
    main()
