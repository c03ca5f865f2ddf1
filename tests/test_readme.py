"""README's commands exist as written: each `biasdd-*` line parses with its own parser, each `dvc exp run
-S key=value` names a param params.yaml has, each stage a `dvc repro` names exists, and the set-up, lint
and test commands are the ones `.ci/run` runs."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

import pytest

from biasdd import dag
from biasdd.params import load_params
from biasdd.study import cluster, grid, report

from .tiny import REPO

README = (REPO / "README.md").read_text()
PARSERS = {
    "biasdd-grid": grid.make_parser,
    "biasdd-report": report.make_parser,
    "biasdd-cluster": cluster.make_parser,
    "biasdd-dag": dag.make_parser,
}


def commands(text: str) -> Iterator[list[str]]:
    """Every command of the ```bash blocks, comments stripped, split as a shell would."""
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in re.split(r"\s&&\s", line):
                words = shlex.split(part, comments=True)
                if words:
                    yield words


COMMANDS = list(commands(README))


def _lookup(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_readme_has_the_commands_it_should():
    names = {words[0] for words in COMMANDS}
    assert {"dvc", "biasdd-grid", "biasdd-report"} <= names


@pytest.mark.parametrize("words", [w for w in COMMANDS if w[0] in PARSERS], ids=lambda w: " ".join(w))
def test_each_biasdd_command_parses(words):
    PARSERS[words[0]]().parse_args(words[1:])  # SystemExit (a test failure) on an unknown option or choice


@pytest.mark.parametrize("words", [w for w in COMMANDS if w[:3] == ["dvc", "exp", "run"]], ids=" ".join)
def test_each_exp_run_names_existing_params(words):
    params = load_params(REPO / "params.yaml")
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    assert overrides, words
    for override in overrides:
        key = override.split("=", 1)[0]
        assert _lookup(params, key), f"{key} is not a param of params.yaml"


def test_each_stage_and_script_named_exists():
    stages = {name for name, _, _, _ in dag.stages(REPO)} | {key for _, key, _, _ in dag.stages(REPO)}
    for words in COMMANDS:
        if words[:2] == ["dvc", "repro"]:
            for target in [w for w in words[2:] if not w.startswith("-")]:
                assert target in stages, target
        for word in words:
            if word.startswith(("stages/", "benchmarks/")):
                assert (REPO / word).exists(), word
    for path in re.findall(r"\]\((docs/[\w./]+|benchmarks/[\w./]+)\)", README):
        assert (REPO / path).exists(), path


LINT = "ruff check src stages tests benchmarks && .venv/bin/ruff format --check src stages tests benchmarks"
SETUP = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"'
TEST = ".venv/bin/python -m pytest -n 2 --dist loadfile"


def test_setup_lint_and_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    for command in (SETUP, LINT, TEST):
        assert command in ci and command in README, command


def test_ci_stops_at_any_failing_command_of_a_list():
    """set -e ignores a failure before the last && of a list (`ruff check` failing let CI pass)."""
    ci = (REPO / ".ci" / "run").read_text()
    lists = [line for line in ci.splitlines() if " && " in line and not line.lstrip().startswith("#")]
    assert lists
    for line in lists:
        assert line.rstrip().endswith("|| exit 1"), line


def test_readme_stays_short():
    assert len(README.splitlines()) <= 200
