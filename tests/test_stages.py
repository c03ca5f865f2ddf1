"""Stage-level behaviour: kill-and-resume of a distillation, validation before work, and agreement of
the method registry, params.yaml and dvc.yaml."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from biasdd.config import load_params, section
from biasdd.distill import CONFIGS, METHODS
from biasdd.pipeline import distill_setup, evaluate_setup

from .tiny import make_tiny

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, edit=None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    make_tiny(params)
    if edit:
        edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _stage(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, "BIASDD_WORKERS": "1"},
    )


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("data")
    params = _params(tmp)
    _stage(
        "download",
        "--params",
        str(params),
        "--embedded",
        str(REPO / "data/embedded"),
        "--out",
        str(tmp / "base.h5"),
    )
    _stage(
        "bias_inject",
        "--params",
        str(params),
        "--base",
        str(tmp / "base.h5"),
        "--out",
        str(tmp / "biased.h5"),
    )
    return tmp / "biased.h5"


def _distill_args(params: Path, biased: Path, out: Path, checkpoints: Path) -> list[str]:
    return [
        "--method",
        "dm",
        "--params",
        str(params),
        "--data",
        str(biased),
        "--out",
        str(out),
        "--loss",
        str(out.with_suffix(".csv")),
        "--checkpoints",
        str(checkpoints),
    ]


@pytest.mark.slow
def test_killed_distillation_resumes_to_the_same_bytes(tmp_path, biased):
    def long_dm(params):
        params["budgets"]["quick"]["distill"]["dm"]["iterations"] = 400
        params["budgets"]["quick"]["distill"]["checkpoint_every"] = 25
        params["budgets"]["quick"]["distill"]["repeats"] = 1

    params = _params(tmp_path, long_dm)
    reference = tmp_path / "reference.h5"
    _stage("distill", *_distill_args(params, biased, reference, tmp_path / "ck_ref"))

    out, checkpoints = tmp_path / "resumed.h5", tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages/distill.py"), *_distill_args(params, biased, out, checkpoints)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = checkpoints / "dm_repeat0.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run ended before its first checkpoint; make it longer"
    assert not out.exists()  # killed: no (partial) artifact
    resumed = _stage("distill", *_distill_args(params, biased, out, checkpoints))
    assert "resuming dm repeat 0 from iteration" in resumed.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert out.with_suffix(".csv").read_bytes() == reference.with_suffix(".csv").read_bytes()
    assert not checkpoint.exists()  # spent checkpoints are removed


def test_checkpoint_of_other_params_is_ignored(tmp_path, biased):
    params = _params(tmp_path)
    out, checkpoints = tmp_path / "a.h5", tmp_path / "ck"
    checkpoints.mkdir()
    from biasdd import io

    io.save_checkpoint(checkpoints / "dm_repeat0.pt", {"fingerprint": "other", "state": {}})
    result = _stage("distill", *_distill_args(params, biased, out, checkpoints))
    assert "made by other params or data" in result.stderr and out.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda p: p.update(budget="huge"),
            r"budget: 'huge' is not valid; choose one of \['quick', 'paper'\]",
        ),
        (lambda p: p.update(device="tpu"), r"device: 'tpu' is not valid"),
        (lambda p: p["budgets"]["quick"]["distill"]["dm"].update(ipc=0), r"distill.dm.ipc"),
        (
            lambda p: p["budgets"]["quick"]["distill"]["dm"].update(lr=1.0),
            r"distill.dm: unknown key\(s\) \['lr'\]",
        ),
        (
            lambda p: p["model"].update(net="resnet"),
            r"model.net: 'resnet' is not valid; choose one of \['convnet3'\]",
        ),
        (lambda p: p["augment"]["dsa"].update(strategy="color_blur"), r"unknown op 'blur'"),
    ],
)
def test_distill_stage_rejects_bad_params_before_work(tmp_path, biased, edit, message):
    params = _params(tmp_path, edit)
    out = tmp_path / "out.h5"
    result = _stage("distill", *_distill_args(params, biased, out, tmp_path / "ck"), check=False)
    assert result.returncode != 0
    assert __import__("re").search(message, result.stderr), result.stderr[-2000:]
    assert not out.exists()


def test_unknown_method_names_the_valid_ones():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValueError, match=r"method: 'mtt' is not valid; choose one of \['dc', 'dm', 'dsa'\]"):
        distill_setup(params, "mtt")
    with pytest.raises(
        ValueError, match=r"augment: 'mixup' is not valid; choose one of \['none', 'dsa', 'dc'\]"
    ):
        bad = load_params(REPO / "params.yaml")
        bad["evaluate"]["synthetic"]["schedule"]["cmnist"]["dm"]["augment"] = "mixup"
        evaluate_setup(bad, "dm")


def test_registry_params_and_dvc_yaml_agree():
    params = load_params(REPO / "params.yaml")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert sorted(params["methods"]) == sorted(METHODS) == sorted(CONFIGS)
    assert dvc["stages"]["distill"]["foreach"] == "${methods}"
    assert sorted(dvc["stages"]["evaluate"]["foreach"]) == sorted(["full", *METHODS])
    for method in METHODS:
        assert dvc["stages"]["evaluate"]["foreach"][method] == f"data/synthetic/{method}.h5"
        assert f"data/synthetic/{method}.h5" in dvc["stages"]["plot"]["deps"]
        assert f"metrics/{method}.json" in dvc["stages"]["plot"]["deps"]
        # every budget builds a valid setup for every method, for both datasets
        for budget in ("quick", "paper"):
            for dataset in ("cmnist", "ccifar10"):
                p = {**params, "budget": budget, "dataset": dataset, "device": "cpu"}
                distill_setup(p, method)
                evaluate_setup(p, method)
                evaluate_setup(p, "full")
    # every params key a stage lists exists in params.yaml (for each method)
    for stage in ("distill", "evaluate"):
        for method in METHODS:
            for key in dvc["stages"][stage]["do"]["params"]:
                node = params
                for part in key.replace("${item}", method).split("."):
                    assert isinstance(node, dict) and part in node, f"{stage}: params key {key} missing"
                    node = node[part]
    for stage in ("download", "bias_inject", "plot"):
        for key in dvc["stages"][stage]["params"]:
            assert key.split(".")[0] in params, key
    # paper values are PROTOCOL's
    paper = {**params, "budget": "paper"}
    assert section(paper, "distill", "dm")["iterations"] == 20000 and section(paper, "model")["width"] == 128
