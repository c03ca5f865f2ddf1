"""The DAG's contract, per stage of dvc.yaml (parametrised over every stage, `foreach` items included):

- code: the biasdd modules the stage's script imports, transitively (read from the source, imports
  inside functions included; importing a submodule runs its packages' `__init__`), are exactly the
  `src/biasdd` files its `deps` list (a listed folder stands for its .py files);
- params: what the script's `configure(params, item)` reads (every stage script validates its params
  there, before any work, and reads no params elsewhere) is covered by its `params` list, and every
  listed key is read.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from biasdd.config import load_params

from .tiny import REPO

SRC = REPO / "src"
PARAMS = load_params(REPO / "params.yaml")


# --- dvc.yaml, resolved ------------------------------------------------------------------------------


def _resolve(value: Any, item: str | None) -> Any:
    if isinstance(value, str):
        if item is not None:
            value = value.replace("${item}", item)
        return re.sub(r"\$\{(\w+)\}", lambda m: str(PARAMS[m.group(1)]), value)
    if isinstance(value, dict):
        return {_resolve(k, item): _resolve(v, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, item) for v in value]
    return value


def stages() -> Iterator[tuple[str, str | None, dict]]:
    """(stage name, foreach item or None, resolved definition) for every stage of dvc.yaml."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, definition in dvc["stages"].items():
        if "foreach" in definition:
            assert definition["foreach"] == "${methods}", name
            for item in PARAMS["methods"]:
                yield f"{name}@{item}", item, _resolve(definition["do"], item)
        else:
            yield name, None, _resolve(definition, None)


STAGES = list(stages())


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _script(definition: dict) -> Path:
    match = re.match(r"PYTHONPATH=src python (stages/\w+\.py)", definition["cmd"])
    assert match, definition["cmd"]
    return REPO / match.group(1)


# --- imports -------------------------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _direct_imports(path: Path, module: str | None) -> set[str]:
    """biasdd modules imported by the file at `path` (anywhere in it)."""
    found: set[str] = set()
    package = None if module is None else (module if path.name == "__init__.py" else module.rsplit(".", 1)[0])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "biasdd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                assert package is not None, f"relative import in {path}"
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "biasdd":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _module_file(sub) else base)
    return found


def code_of(script: Path) -> set[Path]:
    """Every src/biasdd file the script runs when it imports what it imports."""
    todo = list(_direct_imports(script, None))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):  # packages run their __init__ first
            name = ".".join(parts[:depth])
            if name in seen or _module_file(name) is None:
                continue
            seen.add(name)
            file = _module_file(name)
            assert file is not None
            todo += list(_direct_imports(file, name))
    return {_module_file(m) for m in seen}  # type: ignore[misc]


def declared_code(definition: dict) -> set[Path]:
    files: set[Path] = set()
    for dep in _paths(definition["deps"]):
        path = REPO / dep
        if not dep.startswith("src/biasdd"):
            continue
        assert path.exists(), f"dep {dep} does not exist"
        files |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return files


@pytest.mark.parametrize(("stage", "item", "definition"), STAGES, ids=[s[0] for s in STAGES])
def test_code_deps_are_exactly_the_modules_the_stage_runs(stage, item, definition):
    script = _script(definition)
    assert str(script.relative_to(REPO)) in _paths(definition["deps"]), f"{stage}: its script is not a dep"
    runs, declared = code_of(script), declared_code(definition)
    rel = lambda paths: sorted(str(p.relative_to(REPO)) for p in paths)  # noqa: E731
    assert rel(runs - declared) == [], f"{stage} runs modules it does not declare"
    assert rel(declared - runs) == [], f"{stage} declares modules it does not run"


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


def test_the_guard_sees_what_it_should():
    """The import reader on a known case: the distill stage runs the driver through the registry."""
    runs = {str(p.relative_to(SRC)) for p in code_of(REPO / "stages/distill.py")}
    assert {"biasdd/__init__.py", "biasdd/distill/__init__.py", "biasdd/distill/driver.py"} <= runs
    assert "biasdd/amplification.py" not in runs and "biasdd/plots.py" not in runs
    read: set[str] = set()
    Recording({"a": {"b": 1, "c": {"d": 2}}}, read)["a"]["c"]["d"]
    assert read == {"a.c.d"}
    dict(Recording({"a": {"b": 1}}, read)["a"])
    assert "a" in read
