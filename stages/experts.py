"""Stage `experts@<method>`: the expert trajectories MTT distils from, trained on the biased training
split; for a method that needs none (DC, DSA, DM), a tiny artifact that says so.

    python stages/experts.py --method mtt --params params.yaml --data data/biased.h5 \
        --out data/experts/mtt.h5 --checkpoints data/checkpoints

Cost: quick budget a few minutes on 2 CPU cores (`experts.num_experts` x `experts.epochs` epochs over the
60,000 training images); paper budget (100 experts x 50 epochs) hours on one GPU; a method that needs no
experts: a second. Checkpoints after every epoch; a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.params import load_params
from biasdd.pipeline import experts as experts_stage
from biasdd.training.runtime import resolve_device


def configure(params: Mapping[str, Any], item: str | None = None) -> experts_stage.ExpertsSetup:
    """Every param this stage reads, checked (`item` = the method)."""
    return experts_stage.configure(params, str(item))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--checkpoints", required=True, type=Path)
    args = parser.parse_args()
    setup_logging()
    setup = configure(load_params(args.params), args.method)  # validates before any work
    if not setup.needed:  # bytes that depend on nothing: a code edit here re-runs nothing downstream
        artifacts.write_h5(args.out, {}, experts_stage.NO_EXPERTS, kind="experts")
        return
    artifacts.check_artifact(args.data, "biased")
    trained = experts_stage.run(setup, args.data, args.checkpoints)
    data_attrs = artifacts.read_attrs(args.data, kind="biased")
    provenance = {
        **setup.provenance(),
        **experts_stage.trajectory_attrs(trained),
        "device": resolve_device(setup.run.device),  # the lease run() took
        "bias_ratio": data_attrs.get("bias_ratio"),
        "severity": data_attrs.get("severity"),
        "code_version": artifacts.code_version(),
    }
    artifacts.write_h5(args.out, experts_stage.trajectory_groups(trained), provenance, kind="experts")
    experts_stage.remove_checkpoints(args.checkpoints, setup.method, setup.cfg.num_experts)


if __name__ == "__main__":
    run_stage(main, "experts")
