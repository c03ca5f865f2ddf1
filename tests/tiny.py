"""Tiny configurations and repositories for end-to-end tests: real embedded MNIST cut to a few hundred
images, narrow nets, a handful of iterations and epochs.

A tiny repository is a copy of the project whose quick budget (`conf/budget/quick.yaml`) is TINY; its
params.yaml is composed from conf/ as `dvc exp run` composes it, so `dvc repro` and `dvc exp run` see
the same values.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from biasdd.params import compose_params

REPO = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "conf", "stages", "src", "data/embedded", ".dvcignore"]

TINY_SCHEDULE = {"epochs": 4, "lr_milestones": [2]}
_GM = {"ipc": 2, "iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 8, "batch_train": 16}

# The quick budget of tiny repositories (package _global_: keys as in params.yaml).
TINY: dict[str, Any] = {
    "budget": "quick",
    "device": "cpu",
    "compute": {"precision": "fp32", "compile": False},
    "download": {"limit_train": 300, "limit_test": 100},
    "plot": {"grid_ipc": 2},
    "model": {"width": 8},
    "distill": {
        "repeats": 2,
        "checkpoint_every": 1,
        "dc": dict(_GM),
        "dsa": dict(_GM),
        "dm": {"ipc": 2, "iterations": 4, "batch_real": 8},
        "mtt": {"ipc": 2, "iterations": 3, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2},
    },
    "experts": {"num_experts": 2, "epochs": 2, "batch_size": 64},
    "evaluate": {
        "synthetic": {
            "repeats": 2,
            "schedule": {
                dataset: {m: dict(TINY_SCHEDULE) for m in ("dc", "dsa", "dm", "mtt")}
                for dataset in ("cmnist", "ccifar10")
            },
        },
        "full": {"repeats": 2, "epochs": 2, "lr_milestones": [1], "limit_train": 200},
    },
    "bias_model": {"steps": 5, "batch_size": 16, "width": 4},
    "bias_classifier": {"steps": 5, "batch_size": 16, "width": 4, "reference_limit": 100},
}


def tiny(edit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """A copy of TINY, changed by `edit`."""
    budget = copy.deepcopy(TINY)
    if edit is not None:
        edit(budget)
    return budget


def write_budget(conf: Path, budget: dict[str, Any], name: str = "quick") -> None:
    text = "# @package _global_\n" + yaml.safe_dump(budget, sort_keys=False)
    (conf / "budget" / f"{name}.yaml").write_text(text)


def tiny_params(
    tmp_path: Path, budget: dict[str, Any] | None = None, overrides: tuple[str, ...] = ()
) -> dict:
    """The params dict a tiny repository composes (without making a repository)."""
    conf = tmp_path / "conf"
    if not conf.exists():
        shutil.copytree(REPO / "conf", conf)
    write_budget(conf, TINY if budget is None else budget)
    return yaml.safe_load(compose_params(conf, overrides))


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"  # `python` in dvc cmds
    out.update(
        DVC_NO_ANALYTICS="1",
        MPLBACKEND="Agg",
        BIASDD_WORKERS="2",
        GIT_AUTHOR_NAME="biasdd-test",
        GIT_AUTHOR_EMAIL="test@biasdd.invalid",
        GIT_COMMITTER_NAME="biasdd-test",
        GIT_COMMITTER_EMAIL="test@biasdd.invalid",
    )
    return out


def run(cwd: Path, *cmd: str, check: bool = True) -> str:
    """Run a command in `cwd`; its stdout + stderr. `check`: fail the test on a non-zero exit."""
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def compose(repo: Path, *overrides: str) -> None:
    """Rewrite the repository's params.yaml from its conf/ (what `dvc exp run` does)."""
    (repo / "params.yaml").write_text(compose_params(repo / "conf", overrides))


def make_repo(
    tmp_path: Path,
    budget: dict[str, Any] | None = None,
    overrides: tuple[str, ...] = (),
    name: str = "repo",
) -> Path:
    """A git + DVC repository at tmp_path/name: the project with the tiny quick budget, committed."""
    repo = tmp_path / name
    repo.mkdir()
    for item in COPY:
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, repo / item)
    write_budget(repo / "conf", TINY if budget is None else budget)
    compose(repo, *overrides)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "init", "-q")
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")  # Hydra on, offline plots page
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny config")
    return repo


def run_stage(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`stages/<name>.py` with `args` in a subprocess, one torch worker, output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, "BIASDD_WORKERS": "1"},
    )
