"""Stage `distill@<method>`: a synthetic set from the biased training split with DC, DSA or DM.

    python stages/distill.py --method dm --params params.yaml --data data/biased.h5 \
        --out data/synthetic/dm.h5 --loss metrics/distill/dm_loss.csv --checkpoints data/checkpoints \
        --bias-model data/bias_model.h5

Cost: quick budget a minute or two on 2 CPU cores; paper budget minutes (DM) to an hour (DC/DSA) on one
GPU. Checkpoints every `distill.checkpoint_every` iterations; a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from biasdd import io
from biasdd.config import load_params, setup_logging
from biasdd.pipeline import distill_setup, loss_table, run_distill, synthetic_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--loss", required=True, type=Path)
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument(
        "--bias-model", type=Path, help="the bias_model stage's scores (debias.mode inferred)"
    )
    args = parser.parse_args()
    setup_logging()
    setup = distill_setup(load_params(args.params), args.method)  # validates before any work
    results, mean, std = run_distill(setup, args.data, args.checkpoints, bias_model_path=args.bias_model)
    data_attrs = io.read_attrs(args.data)
    provenance = {
        **setup.provenance(),
        "device": setup.run.device,
        "bias_ratio": data_attrs.get("bias_ratio"),
        "severity": data_attrs.get("severity"),
        "code_version": io.code_version(),
    }
    io.write_h5(args.out, synthetic_groups(results, mean, std), provenance)
    io.write_text(args.loss, loss_table(results))
    for repeat in range(setup.repeats):  # done: the checkpoints are spent
        (args.checkpoints / f"{setup.method}_repeat{repeat}.pt").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
