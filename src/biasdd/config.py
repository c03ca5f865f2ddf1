"""Typed, frozen configs built from `params.yaml` sections.

Every module keeps its own frozen dataclass next to the code that uses it (nanoGPT style); this module
only holds the strict constructor that turns a params dict into one, and the budget overlay.
A wrong key or type fails loudly, naming the key and what is valid, before any long computation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

BUDGETS = ("quick", "paper")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read `params.yaml` into a plain dict."""
    with open(path) as f:
        params = yaml.safe_load(f)
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    return params


def _deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def budget_of(params: Mapping[str, Any]) -> str:
    """The active budget name, validated."""
    budget = params.get("budget", "paper")
    if budget not in BUDGETS:
        raise ValueError(f"budget: {budget!r} is not valid; choose one of {list(BUDGETS)}")
    return budget


def section(params: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """The params section at `keys` (e.g. `"distill", "dm"`), with the active budget's overrides applied.

    `params["budgets"][budget]` mirrors the layout of `params.yaml`; its values win over the sections'
    own (which hold the paper's values), so `dvc exp run -S budget=paper` is all it takes to switch.
    """
    budget = budget_of(params)
    node: Any = params
    overlay: Any = (params.get("budgets") or {}).get(budget) or {}
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"params: missing section {'.'.join(keys)!r} (no key {key!r})")
        node = node[key]
        overlay = overlay.get(key, {}) if isinstance(overlay, Mapping) else {}
    if not isinstance(node, Mapping):
        raise ValueError(f"params: {'.'.join(keys)!r} must be a mapping, got {node!r}")
    return _deep_merge(node, overlay or {})


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args, strict=True))
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, Mapping)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_dict(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build the frozen dataclass `cls` from `values`, rejecting unknown keys and wrong types.

    `where` names the params section in error messages (e.g. "distill.dm").
    Fields typed `Literal[...]` list their valid choices in the message.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        annotation = hints[name]
        if not _type_ok(value, annotation):
            if typing.get_origin(annotation) is typing.Literal:
                valid = f"one of {list(typing.get_args(annotation))}"
            else:
                valid = f"a value of type {getattr(annotation, '__name__', annotation)}"
            raise ValueError(f"{where}.{name}: {value!r} is not valid; expected {valid}")
        if annotation is float and isinstance(value, int):
            value = float(value)
        if typing.get_origin(annotation) is tuple:
            value = tuple(value)
        kwargs[name] = value
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise KeyError(f"{where}: missing key(s) {missing}")
    return cls(**kwargs)


def check_range(where: str, value: float, low: float, high: float) -> None:
    """Raise ValueError naming `where` unless low <= value <= high."""
    if not (low <= value <= high):
        raise ValueError(f"{where}: {value!r} is out of range; valid values are in [{low}, {high}]")


def pick(params: Mapping[str, Any], keys: tuple[str, ...], where: str = "params") -> dict[str, Any]:
    """The top-level `keys` of params; a missing one is an error naming it."""
    missing = [k for k in keys if k not in params]
    if missing:
        raise KeyError(f"{where}: missing key(s) {missing}")
    return {k: params[k] for k in keys}


def setup_logging(level: int = logging.INFO) -> None:
    """Stage entry points log to stderr with timestamps; library code only calls getLogger."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def derive_seed(seed: int, *names: str | int) -> int:
    """A sub-seed for (`seed`, names...), e.g. ("distill", "dm", 0); stable across runs and machines."""
    digest = hashlib.sha256(json.dumps([seed, *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """`auto` -> cuda when present, else cpu; `cpu`, `cuda` and `cuda:N` as given (checked)."""
    import torch

    if not isinstance(name, str) or not (name in DEVICES or name.startswith("cuda:")):
        raise ValueError(f"device: {name!r} is not valid; choose one of {list(DEVICES)} or 'cuda:N'")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but no CUDA device is available; use 'auto' or 'cpu'")
    return name
