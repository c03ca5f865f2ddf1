"""Stages `bias_model` and `bias_classifier` (issue 6): the models behind debiased distillation.

    python stages/bias_model.py --params params.yaml --data data/biased.h5 --out data/bias_model.h5
    python stages/bias_model.py --classifier --params params.yaml --data data/biased.h5 \
        --out data/bias_classifier.pt --metrics metrics/bias_classifier.json

Default: train a deliberately biased model with GCE on the biased training split (no attribute labels)
and write every training sample's score 1 - p_b(y | x) (`train/scores`), which `debias.mode: inferred`
turns into weights. `--classifier`: train the bias-only attribute classifier of the bias-amplification
diagnostic (uses attribute labels; evaluation only) and write its weights, its attribute accuracy and the
real set's aligned share (the reference).

Cost: quick budget about a minute each on 2 CPU cores (60,000 CMNIST-DD images, width 16); seconds on
one GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from biasdd import io
from biasdd.config import load_params, setup_logging
from biasdd.pipeline import bias_model_setup, run_bias_classifier, run_bias_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--classifier", action="store_true", help="train the bias-only attribute classifier")
    parser.add_argument("--metrics", type=Path, help="with --classifier: its metrics JSON")
    args = parser.parse_args()
    if args.classifier and args.metrics is None:
        parser.error("--classifier needs --metrics")
    setup_logging()
    setup = bias_model_setup(load_params(args.params))  # validates before any work
    if args.classifier:
        checkpoint, metrics = run_bias_classifier(setup, args.data)
        io.save_checkpoint(args.out, {**checkpoint, "code_version": io.code_version()})
        io.write_json(args.metrics, {**metrics, "code_version": io.code_version()})
    else:
        groups = run_bias_model(setup, args.data)
        io.write_h5(args.out, groups, {**setup.provenance("bias_model"), "code_version": io.code_version()})


if __name__ == "__main__":
    main()
