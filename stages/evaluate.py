"""Stage `evaluate@<name>`: train evaluation networks on the full biased set (`full`) or on a synthetic
set (`dc`, `dsa`, `dm`) and score them on the unbiased test splits (PROTOCOL section 7).

    python stages/evaluate.py --name full --params params.yaml --data data/biased.h5 \
        --train data/biased.h5 --metrics metrics/full.json
    python stages/evaluate.py --name dm --params params.yaml --data data/biased.h5 \
        --train data/synthetic/dm.h5 --metrics metrics/dm.json

`--data` holds the test splits (and the normalisation); `--train` the training set: the biased set
itself for `full`, else the method's synthetic set.

Cost: quick budget about a minute per stage on 2 CPU cores; paper budget seconds (synthetic, 3 networks
batched) to a few minutes (full set) on one GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from biasdd import io
from biasdd.config import load_params, setup_logging
from biasdd.pipeline import evaluate_setup, run_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="full, or a method key (dc, dsa, dm)")
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument(
        "--bias-classifier", type=Path, help="the bias-only classifier (amplification metrics)"
    )
    args = parser.parse_args()
    setup_logging()
    setup = evaluate_setup(load_params(args.params), args.name)  # validates before any work
    metrics = run_evaluate(
        setup,
        args.data,
        None if args.name == "full" else args.train,
        bias_classifier_path=args.bias_classifier,
    )
    metrics["code_version"] = io.code_version()
    io.write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
