"""The DAG's contract, per stage of dvc.yaml (parametrised over every stage, `foreach` items included):

- code: the biasdd modules the stage's script imports, transitively (read from the source, imports
  inside functions included; importing a submodule runs its packages' `__init__`), are exactly the
  `src/biasdd` files its `deps` list (a listed folder stands for its .py files);
- params: what the script's `configure(params, item)` reads (every stage script validates its params
  there, before any work, and reads no params elsewhere) is covered by its `params` list, and every
  listed key is read.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from biasdd.dag import code_of, declared_code, expected_deps, paths, rewrite, script_of, stages
from biasdd.dag import main as dag_main
from biasdd.errors import UserError
from biasdd.params import load_params
from biasdd.vocab import METHODS

from .tiny import REPO

SRC = REPO / "src"
# Every registered method's stages, not only the default run's (`methods` leaves MTT out).
PARAMS = {**load_params(REPO / "params.yaml"), "methods": list(METHODS)}


STAGES = [(name, item, definition) for name, _, item, definition in stages(REPO, PARAMS)]


def _script(definition: dict) -> Path:
    return script_of(definition, REPO)


@pytest.mark.parametrize(("stage", "item", "definition"), STAGES, ids=[s[0] for s in STAGES])
def test_code_deps_are_exactly_the_modules_the_stage_runs(stage, item, definition):
    script = _script(definition)
    assert str(script.relative_to(REPO)) in paths(definition["deps"]), f"{stage}: its script is not a dep"
    runs, declared = code_of(script, SRC), declared_code(definition, REPO)
    rel = lambda files: sorted(str(p.relative_to(REPO)) for p in files)  # noqa: E731
    assert rel(runs - declared) == [], f"{stage} runs modules it does not declare"
    assert rel(declared - runs) == [], f"{stage} declares modules it does not run"


def test_dvc_yaml_code_deps_are_what_biasdd_dag_writes():
    """`biasdd-dag --write` is how the deps are kept; dvc.yaml must be its output (`--check`)."""
    text = (REPO / "dvc.yaml").read_text()
    assert rewrite(text, expected_deps(REPO)) == text, "run `biasdd-dag --write`"
    assert dag_main(["--check", "--repo", str(REPO)]) == 0


def test_biasdd_dag_rewrites_only_code_lines(tmp_path):
    """A stale code dep is replaced in place; data deps, comments and other keys stay as they are."""
    text = (
        "stages:\n  a:\n    cmd: PYTHONPATH=src python stages/a.py\n    deps:\n      - stages/a.py\n"
        "      - src/biasdd/old.py   # gone\n      - data/x.h5         # data\n    params:\n      - seed\n"
    )
    out = rewrite(text, {"a": ["src/biasdd/new.py", "src/biasdd/vocab.py"]})
    assert out == (
        "stages:\n  a:\n    cmd: PYTHONPATH=src python stages/a.py\n    deps:\n      - stages/a.py\n"
        "      - src/biasdd/new.py\n      - src/biasdd/vocab.py\n      - data/x.h5         # data\n"
        "    params:\n      - seed\n"
    )
    assert rewrite(out, {"a": ["src/biasdd/new.py", "src/biasdd/vocab.py"]}) == out


# --- params --------------------------------------------------------------------------------------------


class Recording(Mapping):
    """A read-only view of params that records what is read: a leaf by its full key, and a section
    by its key when it is iterated (read whole)."""

    def __init__(self, data: Mapping, log: set[str], prefix: str = "") -> None:
        self._data, self._log, self._prefix = data, log, prefix

    def _key(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        if isinstance(value, Mapping):
            return Recording(value, self._log, self._key(key))
        self._log.add(self._key(key))
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self):
        if self._prefix:
            self._log.add(self._prefix)
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _covered(key: str, by: str) -> bool:
    return key == by or key.startswith(by + ".")


def _load(script: Path):
    spec = importlib.util.spec_from_file_location(f"stage_{script.stem}", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def params_read(definition: dict, item: str | None) -> set[str]:
    read: set[str] = set()
    params = {**PARAMS, "device": "cpu"}  # `auto` would look for a GPU
    _load(_script(definition)).configure(Recording(params, read), item)
    return read


@pytest.mark.parametrize(("stage", "item", "definition"), STAGES, ids=[s[0] for s in STAGES])
def test_params_read_are_declared(stage, item, definition):
    read = params_read(definition, item)
    declared = definition.get("params", [])
    missing = sorted(k for k in read if not any(_covered(k, d) for d in declared))
    assert missing == [], f"{stage} reads params it does not declare"
    if item is None:
        unused = sorted(d for d in declared if not any(_covered(k, d) or _covered(d, k) for k in read))
        assert unused == [], f"{stage} declares params it does not read"


def test_every_declared_param_of_a_foreach_stage_is_read_by_some_item():
    """A `foreach` stage shares one params list (DSA's settings are declared for distill@dc too)."""
    for name in {s[0].split("@")[0] for s in STAGES if s[1] is not None}:
        items = [s for s in STAGES if s[0].split("@")[0] == name]
        read = set().union(*(params_read(definition, item) for _, item, definition in items))
        for _, item, definition in items:
            declared = [d.replace(f".{item}", ".${item}") for d in definition.get("params", [])]
            unused = sorted(
                d
                for d in declared
                if not any(
                    _covered(k, d.replace("${item}", i)) or _covered(d.replace("${item}", i), k)
                    for k in read
                    for _, i, _ in items
                )
            )
            assert unused == [], f"{name}: declared params no item reads"


def test_every_method_has_its_experts_distill_and_evaluate_stages():
    names = {name for name, _, _ in STAGES}
    assert {f"{stage}@{m}" for stage in ("experts", "distill", "evaluate") for m in METHODS} <= names
    assert "experts@mtt" in names and "distill@mtt" in names
    # the experts stage runs no distillation code: an edit of a method must not retrain MTT's experts
    assert not [p for p in code_of(REPO / "stages/experts.py", SRC) if "distill" in p.parts]


def test_the_guard_sees_what_it_should():
    """The import reader on a known case: the distill stage runs the driver through the registry."""
    runs = {str(p.relative_to(SRC)) for p in code_of(REPO / "stages/distill.py", SRC)}
    assert {"biasdd/__init__.py", "biasdd/distill/__init__.py", "biasdd/distill/driver.py"} <= runs
    assert "biasdd/pipeline/bias_classifier.py" not in runs and "biasdd/figures.py" not in runs
    read: set[str] = set()
    Recording({"a": {"b": 1, "c": {"d": 2}}}, read)["a"]["c"]["d"]
    assert read == {"a.c.d"}
    dict(Recording({"a": {"b": 1}}, read)["a"])
    assert "a" in read


def _set(params: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(params)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return out


@pytest.mark.parametrize(("stage", "item", "definition"), STAGES, ids=[s[0] for s in STAGES])
def test_a_bad_value_names_its_own_key(stage, item, definition):
    """Every param a stage reads, set to a value of no valid type, fails its `configure` with one line
    that names that key (or the section holding it), never a key that does not exist: an override
    `-S evaluate.synthetic.repeats=0` once answered "evaluate.repeats: 0 is not valid"."""
    configure = _load(_script(definition)).configure
    leaves = sorted(k for k in params_read(definition, item) if not isinstance(_lookup(PARAMS, k), dict))
    assert leaves, stage
    for key in leaves:
        with pytest.raises(UserError) as raised:
            configure(_set({**PARAMS, "device": "cpu"}, key, {"not": "valid"}), item)
        message = str(raised.value)
        named = message.split(": ")[0]
        assert "\n" not in message, (key, message)
        assert key == named or key.startswith(named + "."), (key, message)


def _lookup(params, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node
