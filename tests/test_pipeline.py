"""End to end: the real `dvc repro` in a temporary copy of the repository, on a tiny config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biasdd import io
from biasdd.distill import METHODS

from .tiny import make_tiny

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


@pytest.mark.slow
def test_dvc_repro_skip_and_exp_run(tmp_path):
    """The foundation's two stages: build, skip on a second repro, exp run re-runs bias_inject only."""
    repo = make_repo(tmp_path, make_tiny)
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


@pytest.mark.slow
def test_whole_pipeline_tiny(tmp_path):
    """`dvc repro` of the whole DAG on a tiny config: synthetic sets, metrics, every plot; then a
    second repro skips everything and `dvc metrics show` reads the metrics."""
    repo = make_repo(tmp_path, make_tiny)
    out = run(repo, "dvc", "repro")
    for stage in (
        ["download", "bias_inject", "plot"]
        + [f"distill@{m}" for m in METHODS]
        + [f"evaluate@{n}" for n in ["full", *METHODS]]
    ):
        assert f"Running stage '{stage}'" in out, stage
    for method in METHODS:
        attrs = io.read_attrs(repo / f"data/synthetic/{method}.h5")
        assert attrs["budget"] == "quick" and attrs["method"] == method and attrs["repeats"] == 2
        first = io.read_h5(repo / f"data/synthetic/{method}.h5", "repeat_0")
        assert first["images"].shape == (20, 3, 28, 28) and first["images"].dtype.name == "float32"
        assert sorted(first["labels"].tolist()) == first["labels"].tolist()
        loss_csv = (repo / f"metrics/distill/{method}_loss.csv").read_text().splitlines()
        assert loss_csv[0] == "iteration,repeat,loss" and len(loss_csv) > 2
    for name in ["full", *METHODS]:
        metrics = json.loads((repo / f"metrics/{name}.json").read_text())
        assert metrics["budget"] == "quick" and metrics["n_repeats"] == 2 and metrics["name"] == name
        for split in ("test_conflicting", "test_uniform"):
            for key in ("accuracy", "aligned_accuracy", "conflicting_accuracy", "worst_group_accuracy"):
                entry = metrics[split][key]
                assert set(entry) == {"mean", "std", "values"} and len(entry["values"]) == 2
            assert metrics[split]["n"]["mean"] == 100
        assert metrics["test_conflicting"]["aligned_accuracy"]["mean"] is None  # no aligned samples at rho 0
        assert 0.0 <= metrics["test_uniform"]["accuracy"]["mean"] <= 1.0
    for png in [
        "biased_samples",
        "synthetic_dc",
        "synthetic_dsa",
        "synthetic_dm",
        "distill_loss",
        "accuracy",
    ]:
        data = (repo / f"plots/{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    for split in ("test_conflicting", "test_uniform"):
        rows = (repo / f"plots/accuracy_{split}.csv").read_text().splitlines()
        assert rows[0].startswith("name,split,accuracy") and len(rows) == 1 + 1 + len(METHODS)
    shown = run(repo, "dvc", "metrics", "show")
    assert "test_uniform.accuracy.mean" in shown and "metrics/dm.json" in shown
    again = run(repo, "dvc", "repro")
    assert "Running stage" not in again
