"""End to end: the real `dvc repro` in a temporary copy of the repository, on a tiny config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "stages", "src", "data/embedded", ".dvcignore"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in dvc cmds
    env.update(
        DVC_NO_ANALYTICS="1",
        MPLBACKEND="Agg",
        BIASDD_WORKERS="2",
        GIT_AUTHOR_NAME="biasdd-test",
        GIT_AUTHOR_EMAIL="test@biasdd.invalid",
        GIT_COMMITTER_NAME="biasdd-test",
        GIT_COMMITTER_EMAIL="test@biasdd.invalid",
    )
    return env


def run(cwd: Path, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def make_repo(tmp_path: Path, edit) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny config")
    return repo


def tiny(params: dict) -> None:
    params["download"]["limit_train"] = 400
    params["download"]["limit_test"] = 100


@pytest.mark.slow
def test_dvc_repro_skip_and_exp_run(tmp_path):
    repo = make_repo(tmp_path, tiny)
    out = run(repo, "dvc", "repro", "bias_inject")
    assert "Running stage 'download'" in out and "Running stage 'bias_inject'" in out
    assert (repo / "data/biased.h5").exists()
    again = run(repo, "dvc", "repro", "bias_inject")
    assert "Running stage" not in again
    assert "Stage 'download' didn't change" in again and "Stage 'bias_inject' didn't change" in again
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "lock")
    exp = run(repo, "dvc", "exp", "run", "bias_inject", "-S", "bias_ratio=0.8")
    assert "Running stage 'bias_inject'" in exp
    assert "Running stage 'download'" not in exp
