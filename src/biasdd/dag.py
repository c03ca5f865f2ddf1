"""`biasdd-dag`: the code each stage of dvc.yaml runs, written into its `deps` (and checked by the tests).

A stage's code is the `src/biasdd` modules its script imports, transitively (read from the source,
imports inside functions included; importing a submodule runs its packages' `__init__`). Listing exactly
those as `deps` is what makes an edit re-run the stages that run the edited code, and only those:

    biasdd-dag            # print each stage's code deps
    biasdd-dag --check    # exit 1 when dvc.yaml's deps differ from them (tests/test_dag.py)
    biasdd-dag --write    # rewrite the `src/biasdd` lines of every stage's deps in dvc.yaml

A folder whose every module the stage runs is listed as the folder. Other deps (data, the script)
and everything else in dvc.yaml are left as they are.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from biasdd.params import load_params

PACKAGE = "biasdd"
CODE_PREFIX = "src/biasdd"


# --- dvc.yaml, resolved ------------------------------------------------------------------------------


def _resolve(value: Any, item: str | None, params: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        if item is not None:
            value = value.replace("${item}", item)
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), value)
    if isinstance(value, dict):
        return {_resolve(k, item, params): _resolve(v, item, params) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, item, params) for v in value]
    return value


def stages(
    repo: Path, params: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, str, str | None, dict]]:
    """(stage name, dvc.yaml key, foreach item or None, resolved definition) for every stage."""
    params = load_params(repo / "params.yaml") if params is None else params
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    for key, definition in dvc["stages"].items():
        if "foreach" in definition:
            items = _resolve(definition["foreach"], None, params)
            items = params[definition["foreach"][2:-1]] if isinstance(items, str) else items
            for item in items:
                yield f"{key}@{item}", key, item, _resolve(definition["do"], item, params)
        else:
            yield key, key, None, _resolve(definition, None, params)


def paths(entries: list) -> list[str]:
    """The paths of a deps/outs list (entries are paths or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def script_of(definition: Mapping[str, Any], repo: Path) -> Path:
    match = re.match(r"PYTHONPATH=src python (stages/\w+\.py)", definition["cmd"])
    if not match:
        raise ValueError(f"cmd does not run a stage script: {definition['cmd']!r}")
    return repo / match.group(1)


# --- imports -------------------------------------------------------------------------------------------


def _module_file(src: Path, module: str) -> Path | None:
    base = src.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _direct_imports(src: Path, path: Path, module: str | None) -> set[str]:
    """biasdd modules imported by the file at `path` (anywhere in it)."""
    found: set[str] = set()
    package = None if module is None else (module if path.name == "__init__.py" else module.rsplit(".", 1)[0])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None:
                    raise ValueError(f"relative import in {path}")
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _module_file(src, sub) else base)
    return found


def code_of(script: Path, src: Path) -> set[Path]:
    """Every src/biasdd file the script runs when it imports what it imports."""
    todo = list(_direct_imports(src, script, None))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):  # packages run their __init__ first
            name = ".".join(parts[:depth])
            file = _module_file(src, name)
            if name in seen or file is None:
                continue
            seen.add(name)
            todo += list(_direct_imports(src, file, name))
    return {f for f in (_module_file(src, m) for m in seen) if f is not None}


def code_deps(script: Path, repo: Path) -> list[str]:
    """The deps lines for the code `script` runs: files, or a folder whose every module it runs."""
    runs = code_of(script, repo / "src")
    listed: list[str] = []
    covered: set[Path] = set()
    package = repo / CODE_PREFIX
    for folder in sorted(p for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        modules = set(folder.rglob("*.py"))
        if modules and modules <= runs and not (modules & covered):
            listed.append(str(folder.relative_to(repo)))
            covered |= modules
    listed += [str(f.relative_to(repo)) for f in runs - covered]
    return sorted(listed)


def declared_code(definition: Mapping[str, Any], repo: Path) -> set[Path]:
    """The src/biasdd files a stage's deps list (a folder stands for its .py files)."""
    files: set[Path] = set()
    for dep in paths(definition.get("deps") or []):
        if dep.startswith(CODE_PREFIX):
            path = repo / dep
            if not path.exists():
                raise FileNotFoundError(f"dvc.yaml: dep {dep} does not exist")
            files |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return files


# --- dvc.yaml, rewritten -------------------------------------------------------------------------------


def expected_deps(repo: Path) -> dict[str, list[str]]:
    """{dvc.yaml stage key: its code deps}; a foreach stage's items share one script."""
    out: dict[str, list[str]] = {}
    for _, key, _, definition in stages(repo):
        out.setdefault(key, code_deps(script_of(definition, repo), repo))
    return out


_STAGE = re.compile(r"^  (\w+):")
_DEPS = re.compile(r"^(\s+)deps:\s*$")


def rewrite(text: str, deps: Mapping[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's `- src/biasdd...` deps lines replaced by `deps[stage]`, placed
    where the first of them was (else after the stage script's line)."""
    out: list[str] = []
    stage, in_deps, item_indent, placed = None, False, "", True
    lines = text.splitlines()
    for line in lines:
        match = _STAGE.match(line)
        if match:
            stage, in_deps = match.group(1), False
        header = _DEPS.match(line)
        if header:
            in_deps, placed, item_indent = True, False, header.group(1) + "  "
            out.append(line)
            continue
        if in_deps:
            stripped = line.strip()
            if stripped.startswith("- "):
                path = stripped[2:].split("#")[0].strip()
                if path.startswith(CODE_PREFIX):
                    if not placed and stage in deps:
                        out += [f"{item_indent}- {d}" for d in deps[stage]]
                        placed = True
                    continue
                out.append(line)
                if path.startswith("stages/") and not placed and stage in deps:
                    out += [f"{item_indent}- {d}" for d in deps[stage]]
                    placed = True
                continue
            in_deps = False
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biasdd-dag", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--check", action="store_true", help="exit 1 when dvc.yaml's code deps are not current"
    )
    group.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the repository root (default: .)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    path = args.repo / "dvc.yaml"
    text = path.read_text()
    new = rewrite(text, expected_deps(args.repo))
    if args.write:
        if new != text:
            path.write_text(new)
        print(f"{path}: code deps {'rewritten' if new != text else 'already current'}")
        return 0
    if args.check:
        if new != text:
            print(f"{path}: code deps are not current; run `biasdd-dag --write`", file=sys.stderr)
            return 1
        print(f"{path}: code deps current")
        return 0
    for key, deps in expected_deps(args.repo).items():
        print(f"{key}:", *deps, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
