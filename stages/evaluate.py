"""Stages `evaluate@<method>` and `evaluate_full`: train evaluation networks on a synthetic set (a
method's) or on the full biased set (`full`), and score them on the unbiased test splits
(docs/protocol.md §7).

    python stages/evaluate.py --name dm --params params.yaml --data data/biased.h5 \
        --train data/synthetic/dm.h5 --bias-classifier data/bias_classifier.pt \
        --metrics-conflicting metrics/test_conflicting/dm.json \
        --metrics-uniform metrics/test_uniform/dm.json \
        --metrics-bias metrics/bias/dm.json --details metrics/details/dm.json
    python stages/evaluate.py --name full --train data/biased.h5 ...   # the full-set baseline

`--data` holds the test splits (and the normalisation); `--train` the training set: the biased set
itself for `full`, else the method's synthetic set. Cost: quick budget under a minute per stage on 2
CPU cores; paper budget seconds (synthetic, 3 networks batched) to minutes (full set) on one GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.params import load_params
from biasdd.pipeline import evaluate


def configure(params: Mapping[str, Any], item: str | None = None) -> evaluate.EvalSetup:
    """Every param this stage reads, checked (`item` = the method, or None for the full set)."""
    return evaluate.configure(params, item or evaluate.FULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="full, or a method key (dc, dsa, dm)")
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--bias-classifier", required=True, type=Path, help="for the amplification metrics")
    parser.add_argument("--metrics-conflicting", required=True, type=Path, help="DVC metrics, rho 0 split")
    parser.add_argument("--metrics-uniform", required=True, type=Path, help="DVC metrics, test_uniform")
    parser.add_argument("--metrics-bias", required=True, type=Path, help="DVC metrics, bias amplification")
    parser.add_argument("--details", required=True, type=Path, help="everything else (not a DVC metric)")
    args = parser.parse_args()
    setup_logging()
    full = args.name == evaluate.FULL
    setup = configure(load_params(args.params), None if full else args.name)  # validates before any work
    artifacts.check_artifact(args.data, "biased")
    if not full:
        artifacts.check_artifact(args.train, "synthetic")
    artifacts.check_artifact(args.bias_classifier, "bias_classifier")
    results = evaluate.run(
        setup, args.data, None if full else args.train, bias_classifier_path=args.bias_classifier
    )
    results["code_version"] = artifacts.code_version()
    files = evaluate.metrics_files(results)
    name = setup.name
    targets = {
        f"test_conflicting/{name}.json": args.metrics_conflicting,
        f"test_uniform/{name}.json": args.metrics_uniform,
        f"bias/{name}.json": args.metrics_bias,
        f"details/{name}.json": args.details,
    }
    for key, path in targets.items():
        artifacts.write_json(path, files[key])


if __name__ == "__main__":
    run_stage(main, "evaluate")
