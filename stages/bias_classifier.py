"""Stage `bias_classifier`: the bias-only attribute classifier of the bias-amplification diagnostic.

    python stages/bias_classifier.py --params params.yaml --data data/biased.h5 \
        --out data/bias_classifier.pt --metrics metrics/bias/classifier.json \
        --details metrics/details/bias_classifier.json

Trains a network to predict the ATTRIBUTE on (class, attribute)-balanced batches (uses attribute
labels; evaluation only, never to distil) and writes its weights, its attribute accuracy and the real
training set's aligned share (the reference; docs/protocol.md §9). Cost: quick budget well under a
minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.params import load_params
from biasdd.pipeline import bias_classifier


def configure(params: Mapping[str, Any], item: str | None = None) -> bias_classifier.ClassifierSetup:
    """Every param this stage reads, checked."""
    return bias_classifier.configure(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path, help="its headline numbers (DVC metrics)")
    parser.add_argument("--details", required=True, type=Path, help="per-class shares, provenance")
    args = parser.parse_args()
    setup_logging()
    setup = configure(load_params(args.params))  # validates before any work
    artifacts.check_artifact(args.data, "biased")
    checkpoint, metrics, details = bias_classifier.run(setup, args.data)
    version = artifacts.code_version()
    artifacts.save_checkpoint(args.out, {**checkpoint, "code_version": version})
    artifacts.write_json(args.metrics, metrics)
    artifacts.write_json(args.details, {**details, "code_version": version})


if __name__ == "__main__":
    run_stage(main, "bias_classifier")
