"""Granularity of the DAG, on the real `dvc repro` in a temporary repository (tiny config, ~1.5-3 min):
a change to one method's distillation params re-runs only that method's chain and the plot; a change to
a plot setting re-runs only the plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .tiny import make_repo, run, tiny

RUNNING = re.compile(r"Running stage '([^']+)'")


def _edit_params(repo: Path, edit) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _tinier(budget: dict) -> None:
    """The tiny config with one repeat and fewer epochs: this test counts stages, not accuracy."""
    budget["distill"]["repeats"] = 1
    budget["evaluate"]["synthetic"]["repeats"] = 1
    budget["evaluate"]["full"]["repeats"] = 1
    for schedule in budget["evaluate"]["synthetic"]["schedule"].values():
        for method in schedule.values():
            method.update(epochs=2, lr_milestones=[1])


def _ran(output: str) -> set[str]:
    return set(RUNNING.findall(output))


@pytest.mark.slow
def test_one_method_param_reruns_only_its_chain_and_plot_param_only_plot(tmp_path):
    repo = make_repo(tmp_path, tiny(_tinier))
    first = run(repo, "dvc", "repro")
    assert {"download", "bias_inject", "distill@dm", "evaluate_full", "plot"} <= _ran(first)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny run")

    # params.yaml holds the values the run uses: DM's learning rate for the images
    _edit_params(repo, lambda p: p["distill"]["dm"].update(lr_img=0.5))
    assert _ran(run(repo, "dvc", "repro")) == {"distill@dm", "evaluate@dm", "plot"}
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "dm lr_img")

    _edit_params(repo, lambda p: p["plot"].update(grid_ipc=1))
    assert _ran(run(repo, "dvc", "repro")) == {"plot"}
    assert "Running stage" not in run(repo, "dvc", "repro")

    # each stage depends on the code it runs: the amplification metric's module re-runs the bias
    # classifier and the evaluations, never a distillation. The plot re-runs only if their outputs
    # changed; a comment edit leaves them byte-identical, so DVC may skip it
    module = repo / "src/biasdd/pipeline/bias_classifier.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    assert _ran(run(repo, "dvc", "repro")) - {"plot"} == {
        "bias_classifier",
        "evaluate@dc",
        "evaluate@dsa",
        "evaluate@dm",
        "evaluate_full",
    }
