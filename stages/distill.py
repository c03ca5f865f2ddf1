"""Stage `distill@<method>`: a synthetic set from the biased training split with DC, DSA, DM or MTT.

    python stages/distill.py --method dm --params params.yaml --data data/biased.h5 \
        --out data/synthetic/dm.h5 --loss metrics/distill/dm_loss.csv --checkpoints data/checkpoints \
        --bias-model data/bias_model.h5 --experts data/experts/dm.h5

Cost, quick budget on 2 CPU cores: about half a minute (DM) to three and a half (DC's three
distillations); paper budget minutes (DM) to hours (DC/DSA) on one GPU. Checkpoints every
`distill.checkpoint_every` iterations; a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.distill import METHODS
from biasdd.params import load_params
from biasdd.pipeline import distill as distill_stage
from biasdd.training.runtime import resolve_device


def configure(params: Mapping[str, Any], item: str | None = None) -> distill_stage.DistillSetup:
    """Every param this stage reads, checked (`item` = the method)."""
    return distill_stage.configure(params, str(item))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--loss", required=True, type=Path)
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument("--bias-model", type=Path, help="the bias_model stage's scores (for debias inferred)")
    parser.add_argument("--experts", type=Path, help="the experts stage's trajectories (for MTT)")
    args = parser.parse_args()
    setup_logging()
    setup = configure(load_params(args.params), args.method)  # validates before any work
    artifacts.check_artifact(args.data, "biased")
    bias_model = args.bias_model if setup.debias.uses_bias_model else None
    if bias_model is not None:
        artifacts.check_artifact(bias_model, "bias_model")
    experts = args.experts if METHODS[setup.method].needs_experts else None
    if experts is not None:
        artifacts.check_artifact(experts, "experts")
    results, mean, std = distill_stage.run(
        setup, args.data, args.checkpoints, bias_model_path=bias_model, experts_path=experts
    )
    data_attrs = artifacts.read_attrs(args.data, kind="biased")
    provenance = {
        **setup.provenance(),
        "device": resolve_device(setup.run.device),  # the lease run() took
        "bias_ratio": data_attrs.get("bias_ratio"),
        "severity": data_attrs.get("severity"),
        "code_version": artifacts.code_version(),
    }
    artifacts.write_h5(
        args.out, distill_stage.synthetic_groups(results, mean, std), provenance, kind="synthetic"
    )
    artifacts.write_text(args.loss, distill_stage.loss_table(results))
    for repeat in range(setup.shared.repeats):  # done: the checkpoints are spent
        distill_stage.checkpoint_path(args.checkpoints, setup.method, repeat).unlink(missing_ok=True)


if __name__ == "__main__":
    run_stage(main, "distill")
