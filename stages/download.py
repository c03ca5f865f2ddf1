"""Stage `download`: the base dataset of `params.dataset` as one HDF5 file.

    python stages/download.py --params params.yaml --embedded data/embedded --out data/base.h5

Cost: a few seconds for MNIST from the embedded copy; CIFAR-10 needs a mirror or the network.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasdd import artifacts
from biasdd.cli import run_stage, setup_logging
from biasdd.params import load_params
from biasdd.pipeline.download import DownloadConfig, base_groups, load_base


def configure(params: Mapping[str, Any], item: str | None = None) -> DownloadConfig:
    """Every param this stage reads, checked."""
    return DownloadConfig.from_params(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--embedded", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    setup_logging()
    cfg = configure(load_params(args.params))  # validates everything before any work
    base = load_base(cfg.dataset, cfg.mirror, args.embedded, Path(cfg.cache_dir), allow_download=cfg.fetch)
    groups, attrs = base_groups(base, cfg)
    artifacts.write_h5(args.out, groups, {**attrs, "code_version": artifacts.code_version()}, kind="base")


if __name__ == "__main__":
    run_stage(main, "download")
