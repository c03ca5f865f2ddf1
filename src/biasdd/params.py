"""`params.yaml`: reading it, and composing it from `conf/` as `dvc exp run` does.

`params.yaml` holds the values a run actually uses: DVC composes it from `conf/config.yaml` and the
budget group `conf/budget/<budget>.yaml` (Hydra) on every `dvc exp run`, so `dvc params diff` shows
what ran. `biasdd-params` does the same composition for `dvc repro` after an edit of `conf/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from biasdd.errors import ConfigError


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read `params.yaml` into a plain dict."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file (run from the repository root)")
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    return params


def compose_params(conf_dir: str | Path = "conf", overrides: list[str] | tuple[str, ...] = ()) -> str:
    """params.yaml's text as `dvc exp run` composes it from `conf_dir` (Hydra, config `config`), with
    `overrides` such as `budget=paper`. For `dvc repro` after editing conf/ (and for tests); needs
    hydra-core, which DVC brings."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biasdd-params", description=main_compose.__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. budget=paper bias_ratio=0.8")
    parser.add_argument("--conf", default="conf", help="the config folder (default: conf)")
    parser.add_argument("--out", default="params.yaml", help="where to write (default: params.yaml)")
    return parser


def main_compose(argv: list[str] | None = None) -> None:
    """`biasdd-params [overrides...]`: rewrite params.yaml from conf/ (what `dvc exp run` does first)."""
    args = make_parser().parse_args(argv)
    Path(args.out).write_text(compose_params(args.conf, args.overrides), encoding="utf-8")
    print(f"wrote {args.out} from {args.conf}/ {' '.join(args.overrides)}".rstrip())
