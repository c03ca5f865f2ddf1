"""Stage-level behaviour: kill-and-resume of a distillation, validation before work (one-line errors,
no traceback), broken input artifacts, and agreement of the method registry, conf/, params.yaml and
dvc.yaml."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from biasdd import artifacts
from biasdd.distill import METHODS
from biasdd.params import compose_params, load_params
from biasdd.pipeline import distill as distill_stage
from biasdd.pipeline import evaluate
from biasdd.pipeline import experts as experts_stage
from biasdd.vocab import STUDY_METHODS

from .tiny import REPO, make_repo, run, tiny_params
from .tiny import run_stage as _stage


def _params(tmp_path: Path, edit=None) -> Path:
    """A tiny params.yaml (composed as in a tiny repository), changed by `edit`."""
    params = tiny_params(tmp_path)
    if edit:
        edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


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


def _distill_args(params: Path, biased: Path, out: Path, checkpoints: Path, method: str = "dm") -> list[str]:
    return [
        "--method",
        method,
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
        "--experts",
        str(checkpoints.parent / "experts" / f"{method}.h5"),  # what `_experts` writes
    ]


def _experts(params: Path, biased: Path, method: str, checkpoints: Path) -> Path:
    """The experts stage's output for `method` beside `checkpoints` (where `_distill_args` looks)."""
    out = checkpoints.parent / "experts" / f"{method}.h5"
    _stage("experts", "--method", method, "--params", str(params), "--data", str(biased), "--out", str(out),
           "--checkpoints", str(checkpoints))  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("method", "iterations"), [("dm", 400), ("mtt", 60)])
def test_killed_distillation_resumes_to_the_same_bytes(tmp_path, biased, method, iterations):
    def long_run(params):
        params["distill"][method]["iterations"] = iterations
        params["distill"]["checkpoint_every"] = 10
        params["distill"]["repeats"] = 1

    params = _params(tmp_path, long_run)
    _experts(params, biased, method, tmp_path / "ck_ref")
    reference = tmp_path / "reference.h5"
    _stage("distill", *_distill_args(params, biased, reference, tmp_path / "ck_ref", method))

    out, checkpoints = tmp_path / "resumed.h5", tmp_path / "ck"
    args = _distill_args(params, biased, out, checkpoints, method)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages/distill.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = checkpoints / f"{method}_repeat0.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run ended before its first checkpoint; make it longer"
    assert not out.exists()  # killed: no (partial) artifact
    resumed = _stage("distill", *args)
    assert f"resuming {method} repeat 0 from iteration" in resumed.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert out.with_suffix(".csv").read_bytes() == reference.with_suffix(".csv").read_bytes()
    assert not checkpoint.exists()  # spent checkpoints are removed


def test_checkpoint_of_other_params_is_ignored(tmp_path, biased):
    params = _params(tmp_path)
    out, checkpoints = tmp_path / "a.h5", tmp_path / "ck"
    checkpoints.mkdir()
    artifacts.save_checkpoint(checkpoints / "dm_repeat0.pt", {"fingerprint": "other", "state": {}})
    result = _stage("distill", *_distill_args(params, biased, out, checkpoints))
    assert "made by other params or data" in result.stderr and out.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda p: p.update(budget="huge"),
            r"budget: 'huge' is not valid; choose one of \['quick', 'hour', 'paper'\]",
        ),
        (lambda p: p.update(device="tpu"), r"device: 'tpu' is not valid"),
        (
            lambda p: p["distill"]["dm"].update(ipc=0),
            r"distill\.dm\.ipc: 0 is not valid; expected an integer in",
        ),
        (
            lambda p: p["distill"]["dm"].update(lr=1.0),
            r"distill\.dm: unknown key\(s\) \['distill\.dm\.lr'\]; valid keys are \[.*'repeats'",
        ),
        (
            lambda p: p["model"].update(net="resnet"),
            r"model\.net: 'resnet' is not valid; choose one of \['convnet3'\]",
        ),
        (
            lambda p: p["augment"]["dsa"].update(strategy="color_blur"),
            r"augment\.dsa\.strategy: unknown op 'blur'",
        ),
        (
            lambda p: p["compute"].update(precision="fp16"),
            r"compute\.precision: 'fp16' is not valid; choose one of",
        ),
        (lambda p: p["distill"].update(repeats=True), r"distill\.repeats: True is not valid"),
        (lambda p: p["distill"]["dm"].update(repeats=0), r"distill\.dm\.repeats: 0 is not valid; expected"),
        (lambda p: p["distill"]["dm"].update(repeats="3"), r"distill\.dm\.repeats: '3' is not valid"),
    ],
)
def test_distill_stage_rejects_bad_params_in_one_line(tmp_path, biased, edit, message):
    params = _params(tmp_path, edit)
    out = tmp_path / "out.h5"
    result = _stage("distill", *_distill_args(params, biased, out, tmp_path / "ck"), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), result.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def _mtt(**values):
    return lambda p: p["distill"]["mtt"].update(values)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_mtt(syn_steps=0), r"distill\.mtt\.syn_steps: 0 is not valid; expected an integer in \[1, inf\)"),
        (
            _mtt(batch_syn=0),
            r"distill\.mtt\.batch_syn: 0 is not valid; expected an integer in \[1, inf\) or null",
        ),
        (_mtt(lr_lr=-1e-5), r"distill\.mtt\.lr_lr: -1e-05 is not valid; expected a number in \(0, inf\)"),
        (_mtt(expert_epochs="two"), r"distill\.mtt\.expert_epochs: 'two' is not valid"),
        (
            lambda p: p["distill"]["mtt"].pop("max_start_epoch"),
            r"missing key\(s\) \['distill\.mtt\.max_start_",
        ),
        (
            lambda p: p["debias"].update(mode="groups"),
            r"debias\.mode: 'groups' is not valid with mtt, which matches no real batches .*; choose 'none'",
        ),
    ],
)
def test_distill_stage_rejects_bad_mtt_params_in_one_line_before_any_work(tmp_path, edit, message):
    params = _params(tmp_path, edit)
    out = tmp_path / "out.h5"
    args = _distill_args(params, tmp_path / "absent.h5", out, tmp_path / "ck", "mtt")
    result = _stage("distill", *args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), result.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_mtt_trajectories_must_reach_the_deepest_target_epoch(tmp_path, biased):
    """The experts' epochs against distill.mtt's start epochs: one line naming both, before distilling."""
    params = _params(tmp_path, lambda p: p["distill"]["mtt"].update(max_start_epoch=2, expert_epochs=2))
    _experts(params, biased, "mtt", tmp_path / "ck")  # the tiny budget's experts: 2 epochs
    result = _stage(
        "distill", *_distill_args(params, biased, tmp_path / "o.h5", tmp_path / "ck", "mtt"), check=False
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "distill.mtt.max_start_epoch - 1 + distill.mtt.expert_epochs = 3 must be at most the experts' 2 " \
        "epochs (`experts.epochs`)" in lines[0]  # fmt: skip
    dm_experts = _experts(params, biased, "dm", tmp_path / "ck")  # a note that DM needs none
    (tmp_path / "experts" / "mtt.h5").write_bytes(dm_experts.read_bytes())
    result = _stage(
        "distill", *_distill_args(params, biased, tmp_path / "o.h5", tmp_path / "ck", "mtt"), check=False
    )
    hint = "holds no expert trajectories (made for another method); rebuild it with `dvc repro experts@mtt`"
    assert hint in result.stderr


def test_a_method_s_own_repeats_override_the_shared_count(tmp_path, biased):
    """`distill.<method>.repeats` sets that method's distillations; null or absent: `distill.repeats`."""

    def edit(p):
        p["distill"]["repeats"] = 1
        p["distill"]["dm"]["repeats"] = 3
        p["distill"]["dsa"].pop("repeats")

    params = load_params(_params(tmp_path, edit))
    assert distill_stage.configure(params, "dm").shared.repeats == 3
    assert distill_stage.configure(params, "dc").shared.repeats == 1  # null in conf/
    assert distill_stage.configure(params, "dsa").shared.repeats == 1  # absent
    # the count is recorded once, as the shared field, not inside the method's own config
    provenance = distill_stage.configure(params, "dm").provenance()
    assert provenance["repeats"] == 3 and "repeats" not in provenance["config"]
    out = tmp_path / "dm.h5"
    _stage("distill", *_distill_args(_params(tmp_path, edit), biased, out, tmp_path / "ck"))
    groups = artifacts.list_groups(out, kind="synthetic")
    assert sorted(g for g in groups if g.startswith("repeat_")) == ["repeat_0", "repeat_1", "repeat_2"]
    assert artifacts.read_attrs(out, kind="synthetic")["repeats"] == 3


def test_debug_switch_keeps_the_traceback(tmp_path, biased):
    params = _params(tmp_path, lambda p: p["distill"]["dm"].update(ipc=0))
    env = {**os.environ, "BIASDD_DEBUG": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/distill.py"),
            *_distill_args(params, biased, tmp_path / "o.h5", tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.parametrize("broken", ["missing", "truncated", "foreign"])
def test_broken_input_artifact_is_one_line_naming_file_and_fix(tmp_path, biased, broken):
    data = tmp_path / "biased.h5"
    if broken == "truncated":
        data.write_bytes(biased.read_bytes()[: biased.stat().st_size // 3])
    elif broken == "foreign":
        artifacts.write_h5(
            data, {"train": {"images": __import__("numpy").zeros((2, 28, 28), "uint8")}}, {}, kind="base"
        )
    params = _params(tmp_path)
    result = _stage(
        "distill", *_distill_args(params, data, tmp_path / "out.h5", tmp_path / "ck"), check=False
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"{data}:" in lines[0] and "dvc repro bias_inject" in lines[0] and "dvc pull" in lines[0]
    expected = {
        "missing": "no such file",
        "truncated": "truncated",
        "foreign": "expected a 'biased' artifact",
    }
    assert expected[broken] in lines[0]


@pytest.mark.parametrize("case", ["missing cifar10", "bad mirror", "md5 mismatch"])
def test_download_source_errors_are_one_line_naming_file_or_key_and_fix(tmp_path, fake_mnist, case):
    """The download stage's source errors are the user's to fix: one line, no traceback, exit 2."""
    mirror, _, _ = fake_mnist  # random digits: their MD5s are not torchvision's
    raw = mirror / "MNIST" / "raw"

    def edit(params: dict) -> None:
        params["download"].update(fetch=False, cache_dir=str(tmp_path / "cache"))
        if case == "missing cifar10":
            params["dataset"] = "ccifar10"
        elif case == "bad mirror":
            params["download"]["mirror"] = str(tmp_path / "no-such-folder")
        else:
            params["download"]["mirror"] = str(mirror)

    params = _params(tmp_path, edit)
    env = {k: v for k, v in os.environ.items() if k != "BIASDD_DATA_MIRROR"}
    result = subprocess.run(
        [sys.executable, str(REPO / "stages/download.py"), "--params", str(params),
         "--embedded", str(REPO / "data/embedded"), "--out", str(tmp_path / "base.h5")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("download: error: ") and "Traceback" not in result.stderr
    expected = {
        "missing cifar10": [
            "no source for cifar10",
            "download.fetch is false",
            "download.mirror",
            "BIASDD_DATA_MIRROR",
        ],
        "bad mirror": [f"download.mirror: '{tmp_path / 'no-such-folder'}' is not a folder", "unset it"],
        "md5 mismatch": [
            f"{raw / 'train-images-idx3-ubyte.gz'}: MD5 mismatch",
            "replace it with the original",
        ],
    }
    for text in expected[case]:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "base.h5").exists()  # nothing half-written


@pytest.mark.parametrize("mode", ["inferred", "inferred_groups", "inferred_fairdd"])
def test_a_label_free_mode_without_its_bias_model_fails_before_any_work(tmp_path, biased, mode):
    params = _params(tmp_path, lambda p: p["debias"].update(mode=mode))
    missing = tmp_path / "no_bias_model.h5"
    args = [
        *_distill_args(params, biased, tmp_path / "out.h5", tmp_path / "ck"),
        "--bias-model",
        str(missing),
    ]
    result = _stage("distill", *args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert f"{missing}: no such file" in lines[0] and "dvc repro bias_model" in lines[0]
    assert not (tmp_path / "out.h5").exists()


def test_unknown_method_and_augment_name_the_valid_ones():
    params = load_params(REPO / "params.yaml")
    valid = r"choose one of \['dc', 'dm', 'dsa', 'mtt'\]"
    with pytest.raises(ValueError, match=rf"method: 'xyz' is not valid; {valid}"):
        distill_stage.configure(params, "xyz")
    with pytest.raises(ValueError, match=rf"method: 'xyz' is not valid; {valid}"):
        experts_stage.configure(params, "xyz")
    with pytest.raises(
        ValueError,
        match=r"evaluate\.synthetic\.schedule\.cmnist\.dm\.augment: 'mixup' is not valid; choose one of "
        r"\['none', 'dsa', 'dc'\]",
    ):
        bad = load_params(REPO / "params.yaml")
        bad["evaluate"]["synthetic"]["schedule"]["cmnist"]["dm"]["augment"] = "mixup"
        evaluate.configure({**bad, "device": "cpu"}, "dm")
    bad = load_params(REPO / "params.yaml")
    bad["evaluate"]["synthetic"]["schedule"]["cmnist"]["mtt"]["lr"] = "learnt"
    with pytest.raises(
        ValueError,
        match=r"evaluate\.synthetic\.schedule\.cmnist\.mtt\.lr: 'learnt' is not valid; expected a number in "
        r"\(0, inf\) or one of \['learned'\]",
    ):
        evaluate.configure({**bad, "device": "cpu"}, "mtt")


def test_stages_run_the_code_of_their_own_checkout(tmp_path):
    """A queued experiment runs in a copy of the repository: its stages must import that copy's
    src/ (the code their deps hash), not the installed biasdd, which may be another checkout's."""
    repo = make_repo(tmp_path)
    init = repo / "src" / "biasdd" / "__init__.py"
    marker = "\nimport sys\nprint('biasdd imported from', __file__, file=sys.stderr)\n"
    init.write_text(init.read_text() + marker)
    output = run(repo, "dvc", "repro", "download")
    assert f"biasdd imported from {init}" in output


def test_params_yaml_is_composed_from_conf():
    """The committed params.yaml is what `dvc exp run` composes from conf/ (the default budget)."""
    assert load_params(REPO / "params.yaml") == yaml.safe_load(compose_params(REPO / "conf"))


def test_registry_conf_and_dvc_yaml_agree():
    params = load_params(REPO / "params.yaml")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert params["methods"] == list(STUDY_METHODS)  # the default run: MTT does not fit its 10 minutes
    assert set(METHODS) == set(params["distill"]) - {"repeats", "checkpoint_every"}
    for stage in ("experts", "distill", "evaluate"):
        assert dvc["stages"][stage]["foreach"] == "${methods}"
    # every budget and dataset gives a valid setup for every method and the full set
    for budget in ("quick", "hour", "paper"):
        for dataset in ("cmnist", "ccifar10"):
            composed = yaml.safe_load(
                compose_params(REPO / "conf", [f"budget={budget}", f"dataset={dataset}"])
            )
            assert composed["budget"] == budget
            composed["device"] = "cpu"
            for method in METHODS:
                distill_stage.configure(composed, method)
                evaluate.configure(composed, method)
                assert experts_stage.configure(composed, method).needed == METHODS[method].needs_experts
            evaluate.configure(composed, "full")
    # the paper budget is the study's numbers (docs/protocol.md §5-7)
    paper = yaml.safe_load(compose_params(REPO / "conf", ["budget=paper"]))
    assert paper["distill"]["dm"]["iterations"] == 20000 and paper["model"]["width"] == 128
    assert paper["distill"]["dc"]["ipc"] == 50 and paper["evaluate"]["full"]["epochs"] == 150
    assert paper["compute"]["precision"] == "fp32"
    # MTT's paper values: the reference's CIFAR-10 IPC 50 settings (docs/protocol.md §6, MTT)
    published = {"ipc": 50, "syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 40, "lr_lr": 1e-5}
    assert {k: paper["distill"]["mtt"][k] for k in published} == published
    assert paper["experts"]["num_experts"] == 100 and paper["experts"]["epochs"] == 50


@pytest.mark.slow
def test_gpu_dm_cell_script_runs_on_the_cpu(tmp_path, biased):
    """benchmarks/gpu_dm_cell.py (part of benchmarks/gpu_check.sh) in its reduced form, on the CPU."""
    out = tmp_path / "dm_cell.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/gpu_dm_cell.py"),
            "--data",
            str(biased),
            "--seconds",
            "1",
            "--out",
            str(out),
            "--work",
            str(tmp_path),
            "--device",
            "cpu",
            "--smoke",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = __import__("json").loads(out.read_text())
    assert figures["reduced"] and figures["iterations"] >= 2
    assert 0.0 <= figures["test_conflicting_accuracy"]["mean"] <= 1.0


@pytest.mark.slow
def test_distill_speed_times_mtt_on_the_cpu(tmp_path):
    """benchmarks/distill_speed.py's MTT case (part of benchmarks/gpu_check.sh), reduced, on the CPU."""
    out = tmp_path / "mtt.json"
    reduced = (
        "--width 4 --ipc 1 --syn-steps 2 --expert-epochs 1 --max-start-epoch 2 --iterations 1 --warmup 1"
    )
    script = str(REPO / "benchmarks/distill_speed.py")
    command = [
        sys.executable,
        script,
        "--device",
        "cpu",
        "--methods",
        "mtt",
        "--shapes",
        "cifar",
        *reduced.split(),
    ]
    command += ["--json", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": "src"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = __import__("json").loads(out.read_text())
    assert row["method"] == "mtt" and row["settings"] == "reduced" and row["syn_steps"] == 2
    assert row["seconds_per_outer_iteration"] > 0


def test_artifact_bytes_change_only_with_the_code_the_stage_runs(tmp_path):
    """An artifact records the version of the code that made it (`artifacts.code_version`): of the modules its
    stage imports, which are its code deps, and no others. Hashing the whole package made a clean clone's
    `dvc repro` write other bytes, so another dvc.lock, than its commit whenever a module the stage does
    not run (here the report) had changed since the stage last ran."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    params = _params(tmp_path)
    out = tmp_path / "base.h5"

    def download() -> str:
        subprocess.run(
            [sys.executable, str(REPO / "stages" / "download.py"), "--params", str(params),
             "--embedded", str(REPO / "data/embedded"), "--out", str(out)],
            check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(src)},
        )  # fmt: skip
        assert artifacts.read_attrs(out, kind="base")["code_version"]
        return artifacts.md5_file(out)

    first = download()
    report = src / "biasdd" / "study" / "report.py"
    report.write_text(report.read_text() + "\n# an edit to a module download does not run\n")
    assert download() == first
    sources = src / "biasdd" / "pipeline" / "download.py"
    sources.write_text(sources.read_text() + "\n# an edit to a module download runs\n")
    assert download() != first
