"""End to end: the real `dvc repro` in a temporary copy of the repository, on a tiny config."""

from __future__ import annotations

import json
import re

import pytest

from biasdd import artifacts
from biasdd.study import experiments
from biasdd.vocab import STUDY_METHODS as METHODS  # the default run's methods (MTT: its own test below)

from .tiny import make_repo, run

RUNNING = re.compile(r"Running stage '([^']+)'")


@pytest.mark.slow
def test_dvc_repro_skip_and_exp_run(tmp_path):
    """The foundation's two stages: build, skip on a second repro, exp run re-runs bias_inject only."""
    repo = make_repo(tmp_path)
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
    repo = make_repo(tmp_path)
    out = run(repo, "dvc", "repro")
    for stage in ["download", "bias_inject", "bias_model", "bias_classifier", "evaluate_full", "plot"] + [
        f"{stage}@{m}" for m in METHODS for stage in ("experts", "distill", "evaluate")
    ]:
        assert f"Running stage '{stage}'" in out, stage
    for method in METHODS:
        attrs = artifacts.read_attrs(repo / f"data/synthetic/{method}.h5")
        assert attrs["budget"] == "quick" and attrs["method"] == method and attrs["repeats"] == 2
        assert attrs["artifact"] == "synthetic" and attrs["compute"] == {
            "precision": "fp32",
            "compile": False,
        }
        first = artifacts.read_h5(repo / f"data/synthetic/{method}.h5", "repeat_0")
        assert first["images"].shape == (20, 3, 28, 28) and first["images"].dtype.name == "float32"
        assert sorted(first["labels"].tolist()) == first["labels"].tolist()
        loss_csv = (repo / f"metrics/distill/{method}_loss.csv").read_text().splitlines()
        assert loss_csv[0] == "iteration,repeat,loss" and len(loss_csv) > 2
    for name in ["full", *METHODS]:
        for split in ("test_conflicting", "test_uniform"):
            headline = json.loads((repo / f"metrics/{split}/{name}.json").read_text())
            assert set(headline) == {"acc", "acc_sd", "conflicting", "worst"}
            assert all(0.0 <= v <= 1.0 for v in headline.values())
        assert set(json.loads((repo / f"metrics/bias/{name}.json").read_text())) == {"share", "delta"}
        details = json.loads((repo / f"metrics/details/{name}.json").read_text())
        assert details["budget"] == "quick" and details["n_repeats"] == 2 and details["name"] == name
        for split in ("test_conflicting", "test_uniform"):
            for key in ("accuracy", "aligned_accuracy", "conflicting_accuracy", "worst_group_accuracy"):
                entry = details[split][key]
                assert set(entry) == {"mean", "std", "values"} and len(entry["values"]) == 2
            assert details[split]["n"]["mean"] == 100
        assert details["test_conflicting"]["aligned_accuracy"]["mean"] is None  # no aligned samples at rho 0
        headline = json.loads((repo / f"metrics/test_uniform/{name}.json").read_text())
        assert headline["acc"] == details["test_uniform"]["accuracy"]["mean"]
    for png in [
        "biased_samples",
        "synthetic_dc",
        "synthetic_dsa",
        "synthetic_dm",
        "distill_loss",
        "accuracy",
    ]:
        data = (repo / f"plots/figures/{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    for split in ("test_conflicting", "test_uniform"):
        rows = (repo / f"plots/accuracy_{split}.csv").read_text().splitlines()
        assert rows[0].startswith("name,split,accuracy") and len(rows) == 1 + 1 + len(METHODS)
    assert set(json.loads((repo / "metrics/bias/model.json").read_text())) == {
        "precision",
        "recall",
        "groups",
    }
    inference = json.loads((repo / "metrics/details/bias_model.json").read_text())
    assert set(inference) == {
        "conflicting_precision", "conflicting_recall", "attribute_accuracy", "groups_found", "groups_true",
        "score_auc", "code_version",
    }  # fmt: skip
    shown = run(repo, "dvc", "metrics", "show")
    assert "metrics/test_conflicting/dm.json" in shown and "acc_sd" in shown
    widest = max(len(line) for line in shown.splitlines())
    assert widest <= 140, f"`dvc metrics show` is {widest} columns wide"
    again = run(repo, "dvc", "repro")
    assert "Running stage" not in again
    assert experiments.workspace_is_current(repo)  # `dvc status --json` of a reproduced workspace: {}


@pytest.mark.slow
def test_a_debias_cell_is_one_exp_run(tmp_path):
    """`dvc exp run -S debias.mode=<mode>` is one debias cell; another mode re-runs the distillation and
    its evaluation only (the bias model, which infers the groups, is shared)."""
    repo = make_repo(tmp_path)
    out = run(repo, "dvc", "exp", "run", "-S", "methods=[dm]", "-S", "debias.mode=inferred_fairdd")
    assert {"bias_model", "distill@dm", "evaluate@dm"} <= set(RUNNING.findall(out))
    attrs = artifacts.read_attrs(repo / "data/synthetic/dm.h5")
    assert attrs["debias"]["mode"] == "inferred_fairdd"
    assert json.loads((repo / "metrics/details/bias_model.json").read_text())["groups_true"] > 0
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "inferred_fairdd")
    again = run(repo, "dvc", "exp", "run", "-S", "methods=[dm]", "-S", "debias.mode=fairdd")
    assert set(RUNNING.findall(again)) == {"distill@dm", "evaluate@dm", "plot"}
    assert artifacts.read_attrs(repo / "data/synthetic/dm.h5")["debias"]["mode"] == "fairdd"


@pytest.mark.slow
def test_one_method_runs_only_its_stages_and_keeps_the_others(tmp_path):
    """`dvc exp run -S 'methods=[dm]'` runs DM's stages and the full set only; adding a method back
    runs only that method's stages, and the kept distillation is not rebuilt."""
    repo = make_repo(tmp_path)
    out = run(repo, "dvc", "exp", "run", "-S", "methods=[dm]")
    ran = set(RUNNING.findall(out))
    assert ran == {
        "download",
        "bias_inject",
        "bias_model",
        "bias_classifier",
        "experts@dm",
        "distill@dm",
        "evaluate@dm",
        "evaluate_full",
        "plot",
    }, ran
    assert not (repo / "data/synthetic/dc.h5").exists()
    summary = json.loads((repo / "plots/summary.json").read_text())
    assert {row["name"] for row in summary["rows"]} == {"full", "dm"}
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "dm only")
    again = run(repo, "dvc", "exp", "run", "-S", "methods=[dm,dc]")
    assert set(RUNNING.findall(again)) == {"experts@dc", "distill@dc", "evaluate@dc", "plot"}
    assert "Stage 'distill@dm' didn't change" in again


@pytest.mark.slow
def test_mtt_runs_only_its_stages_and_the_experts_and_an_unknown_method_fails_in_one_line(tmp_path):
    """`dvc exp run -S 'methods=[mtt]'`: MTT's experts, distillation and evaluation (at the set's learned
    learning rate) and the shared stages; `methods=[xyz]` stops at experts@xyz with our one-line error."""
    repo = make_repo(tmp_path)
    out = run(repo, "dvc", "exp", "run", "-S", "methods=[mtt]")
    assert set(RUNNING.findall(out)) == {
        "download",
        "bias_inject",
        "bias_model",
        "bias_classifier",
        "experts@mtt",
        "distill@mtt",
        "evaluate@mtt",
        "evaluate_full",
        "plot",
    }
    trajectories = artifacts.read_h5(repo / "data/experts/mtt.h5", "trajectories", kind="experts")
    assert trajectories["params"].shape[:2] == (2, 3)  # TINY: 2 experts, 2 epochs (+ the init)
    learned = [
        artifacts.read_attrs(repo / "data/synthetic/mtt.h5", f"repeat_{r}")["learned_lr"] for r in (0, 1)
    ]
    details = json.loads((repo / "metrics/details/mtt.json").read_text())
    assert details["learned_lr"] == learned and details["provenance"]["train"]["lr"] == "learned"
    assert learned[0] != learned[1] and all(0 < lr < 1 for lr in learned)
    headline = json.loads((repo / "metrics/test_conflicting/mtt.json").read_text())
    assert 0.0 <= headline["acc"] <= 1.0
    summary = json.loads((repo / "plots/summary.json").read_text())
    assert {row["name"] for row in summary["rows"]} == {"full", "mtt"}

    failed = run(repo, "dvc", "exp", "run", "-S", "methods=[xyz]", check=False)
    ours = [line for line in failed.splitlines() if line.startswith("experts: error: ")]
    assert ours == [
        "experts: error: method: 'xyz' is not valid; choose one of ['dc', 'dm', 'dsa', 'mtt'] "
        "(set BIASDD_DEBUG=1 for a traceback)"
    ], failed[-3000:]
    assert "Parameters" not in failed and "are missing" not in failed


@pytest.mark.slow
def test_params_show_the_values_each_experiment_used(tmp_path):
    """The budget is a Hydra config group: `dvc exp show` and `dvc params diff` report each run's own
    values (the quick run's iterations, the paper run's), not an overlay they must resolve by hand."""
    repo = make_repo(tmp_path)
    run(repo, "dvc", "exp", "run", "-n", "quick-run", "download")
    run(repo, "dvc", "exp", "run", "-n", "paper-run", "-S", "budget=paper", "download")
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    params = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            data = exp["revs"][0]["data"]["params"]["params.yaml"]["data"]
            params[exp["name"]] = data
    assert (
        params["quick-run"]["budget"] == "quick" and params["quick-run"]["distill"]["dm"]["iterations"] == 4
    )
    assert (
        params["paper-run"]["budget"] == "paper"
        and params["paper-run"]["distill"]["dm"]["iterations"] == 20000
    )
    assert params["paper-run"]["model"]["width"] == 128 and params["quick-run"]["model"]["width"] == 8
    diff = run(repo, "dvc", "params", "diff", "quick-run", "paper-run")
    line = next(line for line in diff.splitlines() if "distill.dm.iterations" in line)
    assert line.split()[-2:] == ["4", "20000"], line
    assert "budgets" not in diff  # no overlay keys
