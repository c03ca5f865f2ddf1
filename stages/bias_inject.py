"""Stage `bias_inject`: CMNIST-DD / CCIFAR10-DD (docs/protocol.md §2-4) from the base dataset.

    python stages/bias_inject.py --params params.yaml --base data/base.h5 --out data/biased.h5

Cost on 2 CPU cores: CMNIST-DD about 10 s, CCIFAR10-DD a few minutes (all cores; `BIASDD_WORKERS` caps).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.config import from_dict, section
from biasdd.errors import ArtifactError
from biasdd.params import load_params
from biasdd.pipeline.bias_inject import BiasConfig, CMNISTConfig, build_biased, default_workers


def configure(params: Mapping[str, Any], item: str | None = None) -> tuple[BiasConfig, CMNISTConfig | None]:
    """Every param this stage reads, checked: the dataset keys, and the colours for CMNIST-DD."""
    cfg = BiasConfig.from_params(params)
    cmnist = from_dict(CMNISTConfig, section(params, "cmnist"), "cmnist") if cfg.dataset == "cmnist" else None
    return cfg, cmnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    setup_logging()
    cfg, cmnist = configure(load_params(args.params))
    artifacts.check_artifact(args.base, "base")
    base_attrs = artifacts.read_attrs(args.base, kind="base")
    if base_attrs.get("dataset") != cfg.dataset:
        raise ArtifactError(
            f"{args.base} holds dataset {base_attrs.get('dataset')!r} but params say {cfg.dataset!r}: "
            "rebuild it with `dvc repro download`"
        )
    train = artifacts.read_h5(args.base, "train", kind="base")
    test = artifacts.read_h5(args.base, "test", kind="base")
    splits = build_biased(
        train["images"],
        train["labels"],
        test["images"],
        test["labels"],
        cfg,
        cmnist,
        workers=default_workers(),
    )
    provenance = {
        "config": dataclasses.asdict(cfg),
        "cmnist": dataclasses.asdict(cmnist) if cmnist else None,
        "code_version": artifacts.code_version(),
        **dataclasses.asdict(cfg),
    }
    artifacts.write_h5(args.out, splits, provenance, kind="biased")


if __name__ == "__main__":
    run_stage(main, "bias_inject")
