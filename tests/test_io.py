import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from biasdd import artifacts
from biasdd.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]


def _groups():
    rng = np.random.default_rng(0)
    return {
        "train": {
            "images": rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8),
            "labels": np.arange(50),
            "@attrs": {"bias_ratio": 0.8},
        },
        "test": {"images": np.zeros((0, 3, 8, 8), dtype=np.uint8)},
    }


def test_write_is_byte_reproducible(tmp_path):
    artifacts.write_h5(tmp_path / "a.h5", _groups(), {"config": {"seed": 0}, "note": "x"})
    artifacts.write_h5(tmp_path / "b.h5", _groups(), {"config": {"seed": 0}, "note": "x"})
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    assert artifacts.read_attrs(tmp_path / "a.h5") == {"config": {"seed": 0}, "note": "x"}
    assert artifacts.read_attrs(tmp_path / "a.h5", "train") == {"bias_ratio": 0.8}
    back = artifacts.read_h5(tmp_path / "a.h5", "train")
    np.testing.assert_array_equal(back["images"], _groups()["train"]["images"])


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(TypeError):
        artifacts.write_h5(target, {"train": {"bad": np.array([object()])}}, {})
    assert list(tmp_path.iterdir()) == []
    # an existing artifact survives a failed rewrite untouched
    artifacts.write_h5(target, _groups(), {})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        artifacts.write_h5(target, {"train": {"bad": np.array([object()])}}, {})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


def test_missing_group_or_file_is_a_clear_error(tmp_path):
    artifacts.write_h5(tmp_path / "a.h5", _groups(), {})
    with pytest.raises(ArtifactError, match="no group 'valid'"):
        artifacts.read_h5(tmp_path / "a.h5", "valid")
    with pytest.raises(
        FileNotFoundError, match=r"none.h5: no such file; rebuild it with `dvc repro bias_inject`"
    ):
        artifacts.read_h5(tmp_path / "none.h5", "train", kind="biased")


def test_checkpoint_roundtrip(tmp_path):
    import torch

    state = {"iteration": 3, "images": torch.ones(2, 2)}
    artifacts.save_checkpoint(tmp_path / "ck.pt", state)
    back = artifacts.load_checkpoint(tmp_path / "ck.pt")
    assert back["iteration"] == 3 and torch.equal(back["images"], state["images"])
    assert artifacts.load_checkpoint(tmp_path / "none.pt") is None


def test_checkpoint_is_byte_reproducible(tmp_path):
    """The same state gives the same bytes (the bias classifier is a DVC output): saved through a path,
    torch named the archive's folder after the random temporary file, so every save differed."""
    import torch

    state = {"weight": torch.arange(6.0).view(2, 3), "code_version": "0.1.0+src.x"}
    artifacts.save_checkpoint(tmp_path / "a" / "classifier.pt", state)
    artifacts.save_checkpoint(tmp_path / "b" / "classifier.pt", state)
    assert (tmp_path / "a" / "classifier.pt").read_bytes() == (tmp_path / "b" / "classifier.pt").read_bytes()


def _run_stages(workdir: Path, params: Path, extra_env=None):
    env = {"BIASDD_WORKERS": "2", **(extra_env or {})}
    import os

    env = {**os.environ, **env}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/download.py"),
            "--params",
            str(params),
            "--embedded",
            str(REPO / "data/embedded"),
            "--out",
            str(workdir / "base.h5"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/bias_inject.py"),
            "--params",
            str(params),
            "--base",
            str(workdir / "base.h5"),
            "--out",
            str(workdir / "biased.h5"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )


def _tiny_params(tmp_path: Path, **top) -> Path:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["limit_train"] = 600
    params["download"]["limit_test"] = 200
    params.update(top)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_same_params_give_byte_identical_biased_files(tmp_path):
    params = _tiny_params(tmp_path)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run_stages(tmp_path / "one", params)
    _run_stages(tmp_path / "two", params, {"BIASDD_WORKERS": "1"})  # worker count must not matter
    for name in ("base.h5", "biased.h5"):
        one = hashlib.md5((tmp_path / "one" / name).read_bytes()).hexdigest()
        two = hashlib.md5((tmp_path / "two" / name).read_bytes()).hexdigest()
        assert one == two, name
    attrs = artifacts.read_attrs(tmp_path / "one" / "biased.h5")
    assert attrs["bias_ratio"] == 0.95 and attrs["config"]["severity"] == 4 and "code_version" in attrs
    train = artifacts.read_h5(tmp_path / "one" / "biased.h5", "train")
    assert train["images"].shape == (600, 3, 28, 28) and train["mean"].shape == (3,)


def test_bad_param_fails_before_work_and_writes_nothing(tmp_path):
    params = _tiny_params(tmp_path, bias_ratio=1.2)
    (tmp_path / "w").mkdir()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/download.py"),
            "--params",
            str(params),
            "--embedded",
            str(REPO / "data/embedded"),
            "--out",
            str(tmp_path / "w/base.h5"),
        ],
        check=True,
    )
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/bias_inject.py"),
            "--params",
            str(params),
            "--base",
            str(tmp_path / "w/base.h5"),
            "--out",
            str(tmp_path / "w/biased.h5"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "bias_inject: error: bias_ratio: 1.2 is not valid; expected a number in [0, 1] (set BIASDD_DEBUG=1 "
        "for a traceback)"
    ]  # one line, no traceback
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["base.h5"]
