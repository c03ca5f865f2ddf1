"""Stage `bias_model`: the biased model behind the label-free debiasing modes (docs/protocol.md §9).

    python stages/bias_model.py --params params.yaml --data data/biased.h5 --out data/bias_model.h5 \
        --metrics metrics/bias/model.json --details metrics/details/bias_model.json

Trains a narrow network with GCE on the biased training split (no attribute labels) and writes every
training sample's score 1 - p_b(y | x) (`train/scores`, for `debias.mode: inferred`) and pseudo-attribute
(`train/pseudo_attributes`, for `inferred_groups` and `inferred_fairdd`), and how well those match the
true attributes (`--metrics`). Cost: quick budget well under a minute on 2 CPU cores; seconds on one GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.params import load_params
from biasdd.pipeline import bias_model


def configure(params: Mapping[str, Any], item: str | None = None) -> bias_model.BiasModelSetup:
    """Every param this stage reads, checked."""
    return bias_model.configure(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--metrics", required=True, type=Path, help="how well it infers the groups (DVC metric)"
    )
    parser.add_argument("--details", required=True, type=Path, help="every inference metric (JSON)")
    args = parser.parse_args()
    setup_logging()
    setup = configure(load_params(args.params))  # validates before any work
    artifacts.check_artifact(args.data, "biased")
    groups, metrics = bias_model.run(setup, args.data)
    provenance = {**setup.provenance(), "code_version": artifacts.code_version()}
    artifacts.write_h5(args.out, groups, provenance, kind="bias_model")
    artifacts.write_json(args.metrics, bias_model.inference_headline(metrics))
    artifacts.write_json(args.details, {**metrics, "code_version": provenance["code_version"]})


if __name__ == "__main__":
    run_stage(main, "bias_model")
