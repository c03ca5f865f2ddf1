"""Typed, frozen configs built from `params.yaml` sections, validated in one place.

Every module keeps its own frozen dataclass next to the code that uses it (nanoGPT style). A field
declares what is valid ONCE, in its annotation: a type, `Literal[...]` choices, or a range through
`Annotated[...]` (`PositiveInt`, `Fraction`, `Range(...)`). `Config.__post_init__` and `from_dict`
check every field against it, and every error names the full key (`distill.dm.iterations`) and the
valid values, before any long computation.

Reading `params.yaml` and composing it from `conf/` live in `biasdd.params`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from biasdd.errors import ConfigError, UnknownKeyError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ge/gt (>=, >) below, le/lt (<=, <) above; None = unbounded."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        low = (
            f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else "(-inf")
        )
        high = (
            f"{self.le:g}]" if self.le is not None else (f"{self.lt:g})" if self.lt is not None else "inf)")
        )
        return f"{low}, {high}"


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]  # momentum: [0, 1)
UnitInterval = Annotated[float, Range(ge=0, le=1)]

_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("biasdd_config_where", default=None)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        ranges = [e for e in extras if isinstance(e, Range)]
        kind = "an integer" if base is int else "a number"
        return f"{kind} in {ranges[0].describe()}" if ranges else _type_name(base)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(annotation))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        inner = _type_name(args[0]) if args else "values"
        return f"a list of {inner}"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` has the annotated type (ranges included)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        if not _matches(value, base):
            return False
        return all(r.contains(float(value)) for r in extras if isinstance(r, Range))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, Mapping)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _coerce(value: Any, annotation: Any) -> Any:
    """ints where floats are declared become floats; lists where tuples are declared become tuples."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _coerce(value, typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _matches(value, arg):
                return _coerce(value, arg)
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True)) if args else tuple(value)
    return value


def check_value(where: str, value: Any, annotation: Any) -> Any:
    """`value` coerced to `annotation`, or a ConfigError naming `where` and what is valid."""
    if not _matches(value, annotation):
        expected = _type_name(annotation)
        verb = "choose" if expected.startswith("one of") else "expected"
        raise ConfigError(f"{where}: {value!r} is not valid; {verb} {expected}")
    return _coerce(value, annotation)


class Config:
    """Base of the frozen param dataclasses: fields are checked against their annotations on
    construction; `check(where)` adds the checks that involve several fields."""

    SECTION: ClassVar[str] = ""  # the params key of this config ("" = top level), for error messages

    def __post_init__(self) -> None:
        where = _WHERE.get()
        where = self.SECTION if where is None else where
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = check_value(key_of(where, f.name), getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self.check(where)

    def check(self, where: str) -> None:
        """Cross-field checks; raise ConfigError naming `where`.<field>."""


def key_of(where: str, name: str) -> str:
    """The full params key of field `name` in section `where` ("" = the top level)."""
    return f"{where}.{name}" if where else name


def from_dict(cls: type[T], values: Mapping[str, Any], where: str, read_apart: Iterable[str] = ()) -> T:
    """Build the frozen dataclass `cls` from the params section `values` (found at key `where`; "" =
    the top level), rejecting unknown and missing keys and values that do not fit the annotations.
    `read_apart`: optional keys of the section that the caller reads itself; valid, not passed to `cls`."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'params'}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    apart = set(read_apart)
    unknown = sorted(set(values) - set(fields) - apart)
    if unknown:
        raise UnknownKeyError(
            f"{where or 'params'}: unknown key(s) {[key_of(where, k) for k in unknown]}; "
            f"valid keys are {sorted(set(fields) | apart)}"
        )
    values = {k: v for k, v in values.items() if k not in apart}
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise UnknownKeyError(f"{where or 'params'}: missing key(s) {[key_of(where, k) for k in missing]}")
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {name: check_value(key_of(where, name), value, hints[name]) for name, value in values.items()}
    token = _WHERE.set(where)
    try:
        return cls(**kwargs)
    finally:
        _WHERE.reset(token)


def section(params: Mapping[str, Any], *keys: str) -> Any:
    """The value at `keys` (e.g. `"distill", "dm"`); a missing key is an error naming the full key."""
    node: Any = params
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            raise UnknownKeyError(f"params: missing key {'.'.join(keys[: depth + 1])!r}")
        node = node[key]
    return node
