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

from biasdd import amplification, io
from biasdd.config import load_params, setup_logging
from biasdd.errors import run_stage


def configure(params: Mapping[str, Any], item: str | None = None) -> amplification.ClassifierSetup:
    """Every param this stage reads, checked."""
    return amplification.configure(params)


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
    io.check_artifact(args.data, "biased")
    checkpoint, metrics, details = amplification.run(setup, args.data)
    version = io.code_version()
    io.save_checkpoint(args.out, {**checkpoint, "code_version": version})
    io.write_json(args.metrics, metrics)
    io.write_json(args.details, {**details, "code_version": version})


if __name__ == "__main__":
    run_stage(main, "bias_classifier")
