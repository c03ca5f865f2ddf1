"""The experts stage (MTT's expert trajectories): the recorded trajectory, determinism, resume after an
interruption or a kill to the same bytes, the artifact of a method that needs no experts, and its
validation (one-line errors before any work)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from biasdd import artifacts
from biasdd.pipeline import experts
from biasdd.training.runtime import derive_seed, net_factory

from .tiny import REPO, tiny_params
from .tiny import run_stage as _stage

TINY_EXPERTS = {"num_experts": 2, "epochs": 3, "lr_teacher": 0.01, "momentum": 0.5, "weight_decay": 5e-4,
                "batch_size": 64}  # fmt: skip


def _params(tmp_path: Path, edit=None) -> Path:
    params = tiny_params(tmp_path)
    params["experts"] = dict(TINY_EXPERTS)
    if edit:
        edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("data")
    params = _params(tmp)
    base, biased = tmp / "base.h5", tmp / "biased.h5"
    _stage("download", "--params", str(params), "--embedded", str(REPO / "data/embedded"), "--out", str(base))
    _stage("bias_inject", "--params", str(params), "--base", str(base), "--out", str(biased))
    return biased


def _setup(tmp_path: Path, edit=None) -> experts.ExpertsSetup:
    params = yaml.safe_load(_params(tmp_path, edit).read_text())
    return experts.configure(params, "mtt")


def _args(method: str, params: Path, biased: Path, out: Path, checkpoints: Path) -> list[str]:
    return ["--method", method, "--params", str(params), "--data", str(biased), "--out", str(out),
            "--checkpoints", str(checkpoints)]  # fmt: skip


class Interrupt(Exception):
    pass


def test_trajectories_start_at_the_seeded_init_and_move_every_epoch(tmp_path, biased):
    setup = _setup(tmp_path)
    trained = experts.run(setup, biased, None, progress=False)
    assert len(trained.params) == 2 and [tuple(p.shape[:1]) for p in trained.params] == [(4,), (4,)]
    # expert k's first snapshot is the init a network draws from derive_seed(seed, "experts", k)
    for k in range(2):
        net = net_factory(setup.run, 3, 28)(torch.Generator().manual_seed(derive_seed(0, "experts", k)))
        assert torch.equal(trained.params[k][0], experts.flat_parameters(net))
        steps = (trained.params[k][1:] - trained.params[k][:-1]).norm(dim=1)
        assert (steps > 0).all()  # every epoch moved the network
    assert not torch.equal(trained.params[0], trained.params[1])
    assert trained.names[0] == "features.0.weight" and trained.shapes[0] == (8, 3, 3, 3)
    assert all(len(loss) == 3 and torch.isfinite(loss).all() for loss in trained.losses)
    # the same params: the same trajectories; another seed: others
    again = experts.run(setup, biased, None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(trained.params, again.params, strict=True))
    other = experts.run(_setup(tmp_path, lambda p: p.update(seed=1)), biased, None, progress=False)
    assert not torch.equal(other.params[0], trained.params[0])


def test_interrupted_run_resumes_to_the_same_trajectories(tmp_path, biased):
    setup = _setup(tmp_path)
    full = experts.run(setup, biased, tmp_path / "ck_full", progress=False)

    def interrupt(expert: int, epoch: int) -> None:
        if (expert, epoch) == (1, 1):  # expert 0 finished, expert 1 one epoch in
            raise Interrupt

    checkpoints = tmp_path / "ck"
    with pytest.raises(Interrupt):
        experts.run(setup, biased, checkpoints, progress=False, on_epoch=interrupt)
    assert experts.checkpoint_path(checkpoints, "mtt", 0).exists()
    assert artifacts.load_checkpoint(experts.checkpoint_path(checkpoints, "mtt"))["epoch"] == 1
    seen: list[tuple[int, int]] = []
    resumed = experts.run(
        setup, biased, checkpoints, progress=False, on_epoch=lambda e, k: seen.append((e, k))
    )
    assert seen == [(1, 2), (1, 3)]  # only what was left
    for a, b in zip(full.params, resumed.params, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(full.losses, resumed.losses, strict=True))
    # checkpoints of other params are ignored, not resumed
    other = _setup(tmp_path, lambda p: p["experts"].update(lr_teacher=0.02))
    assert not torch.equal(experts.run(other, biased, checkpoints, progress=False).params[0], full.params[0])


def test_a_method_without_experts_writes_the_same_tiny_artifact_whatever_the_params(tmp_path, biased):
    outs = []
    for method, edit in [("dm", None), ("dc", lambda p: p["experts"].update(epochs=9, num_experts=7))]:
        params = _params(tmp_path, edit)
        out = tmp_path / f"{method}.h5"
        started = time.time()
        _stage("experts", *_args(method, params, biased, out, tmp_path / "ck"))
        assert time.time() - started < 30  # no training
        outs.append(out.read_bytes())
        assert artifacts.read_attrs(out, kind="experts") == {"artifact": "experts", "needs_experts": False}
    assert outs[0] == outs[1] and len(outs[0]) < 8192


@pytest.mark.parametrize(
    ("method", "edit", "message"),
    [
        ("xyz", None, r"method: 'xyz' is not valid; choose one of \['dc', 'dm', 'dsa', 'mtt'\]"),
        (
            "mtt",
            lambda p: p["experts"].update(epochs=0),
            r"experts\.epochs: 0 is not valid; expected an integer",
        ),
        (
            "dm",
            lambda p: p["experts"].update(momentum=1.0),
            r"experts\.momentum: 1\.0 is not valid; expected",
        ),
        (
            "mtt",
            lambda p: p["experts"].pop("batch_size"),
            r"experts: missing key\(s\) \['experts\.batch_size'\]",
        ),
        (
            "mtt",
            lambda p: p["experts"].update(lr=1),
            r"experts: unknown key\(s\) \['experts\.lr'\]; valid keys",
        ),
    ],
)
def test_bad_params_end_in_one_line_before_any_work(tmp_path, method, edit, message):
    params = _params(tmp_path, edit)
    out = tmp_path / "out.h5"
    result = _stage(
        "experts", *_args(method, params, tmp_path / "absent.h5", out, tmp_path / "ck"), check=False
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("experts: error: "), result.stderr[-2000:]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_killed_experts_stage_resumes_to_the_same_bytes(tmp_path, biased):
    params = _params(tmp_path, lambda p: p["experts"].update(num_experts=2, epochs=4))
    reference = tmp_path / "reference.h5"
    _stage("experts", *_args("mtt", params, biased, reference, tmp_path / "ck_ref"))

    out, checkpoints = tmp_path / "resumed.h5", tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages/experts.py"), *_args("mtt", params, biased, out, checkpoints)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    finished = experts.checkpoint_path(checkpoints, "mtt", 0)
    deadline = time.time() + 120
    while not finished.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert finished.exists(), "the run ended before its first expert; make it longer"
    assert not out.exists()  # killed: no (partial) artifact
    resumed = _stage("experts", *_args("mtt", params, biased, out, checkpoints))
    assert "finished before, read from its checkpoint" in resumed.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert not any(checkpoints.iterdir())  # spent checkpoints are removed
    data = artifacts.read_h5(out, "trajectories", kind="experts")
    assert data["params"].shape[:2] == (2, 5) and data["loss"].shape == (2, 4)
    attrs = artifacts.read_attrs(out, kind="experts")
    assert attrs["needs_experts"] is True
    assert len(attrs["param_names"]) == len(attrs["param_shapes"]) == 14
