"""Pass configurations from typed dataclass fields: valid ones, and ones construction must reject.

Each init field of a dataclass pass gets a strategy from its annotation (``bool``, ``int``,
``float``, ``str``, ``Literal``, ``Optional``/unions, ``tuple[...]``). A class refines fields
with a ``strategy_overrides`` mapping (a class attribute, or a classmethod returning it) of
field name to one of:

* a hypothesis strategy: the values to draw (opaque: no invalid values are derived from it);
* a range, plain data: ``{"min_value": 0.0, "max_value": 1.0, "exclude_max": True}`` (keys as
  in ``hypothesis.strategies.floats``); valid values are drawn inside it, and NaN and values
  outside it are invalid;
* a list of choices: ``[None]``, ``["a", "b"]``.

Plain-data overrides keep a pass module free of any hypothesis import. ``targets`` and
``ignore`` of a :class:`~llmslim.PassBase` keep their defaults unless overridden.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .._pass import PassBase
from .._validate import _MISMATCH, coerce
from ..errors import ConfigError

__all__ = ["field_strategies", "valid_kwargs", "invalid_values", "build_or_none"]

_RANGE_KEYS = frozenset({"min_value", "max_value", "exclude_min", "exclude_max"})
_NAME_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=8)
# Values of the wrong type for most annotations; each is kept only where coerce() rejects it.
_WRONG: tuple[Any, ...] = (None, True, 0, 1.5, "x", (1,), b"x")


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"passes() and invalid_configs() need a dataclass pass class (got {cls!r})")
    return [f for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _overrides(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    hook = getattr(cls, "strategy_overrides", None)
    base = hook() if callable(hook) else hook
    if base is None:
        base = {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"{cls.__name__}.strategy_overrides must be a mapping of field name to strategy, range or choices (got {base!r})")
    merged = {**base, **given}
    names = {f.name for f in _fields(cls)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ConfigError(f"strategy overrides for {cls.__name__} name unknown field(s) {unknown}; fields are: {sorted(names)}")
    for name, value in merged.items():
        if isinstance(value, Mapping) and (not value or set(value) - _RANGE_KEYS):
            raise ConfigError(
                f"override of {cls.__name__}.{name} must be a strategy, a list of choices or a range with keys "
                f"{sorted(_RANGE_KEYS)} (got {value!r})"
            )
        if not isinstance(value, (SearchStrategy, Mapping, list, tuple)):
            raise ConfigError(f"override of {cls.__name__}.{name} must be a strategy, a list of choices or a range (got {value!r})")
    return merged


def _is_none(tp: Any) -> bool:
    return tp is type(None)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else None


def _numeric(tp: Any) -> Any:
    """The ``int`` or ``float`` inside ``tp`` (``float``, ``int | None`` ...), or ``None``."""
    args = _union_args(tp)
    options = [a for a in (args if args is not None else (tp,)) if not _is_none(a)]
    return options[0] if len(options) == 1 and options[0] in (int, float) else None


def _range_strategy(tp: Any, rng: Mapping[str, Any]) -> SearchStrategy[Any]:
    kind = _numeric(tp)
    if kind is int:
        lo, hi = rng.get("min_value"), rng.get("max_value")
        lo = None if lo is None else math.ceil(lo) + (1 if rng.get("exclude_min") and lo == math.ceil(lo) else 0)
        hi = None if hi is None else math.floor(hi) - (1 if rng.get("exclude_max") and hi == math.floor(hi) else 0)
        inner: SearchStrategy[Any] = st.integers(min_value=lo, max_value=hi)
    elif kind is float:
        inner = st.floats(allow_nan=False, **dict(rng))
    else:
        raise ConfigError(f"a range override needs an int or float field (got {tp!r})")
    args = _union_args(tp)
    return st.one_of(st.none(), inner) if args is not None and any(_is_none(a) for a in args) else inner


def _value_strategy(tp: Any, default: Any) -> SearchStrategy[Any] | None:
    origin = typing.get_origin(tp)
    if _is_none(tp):
        return st.none()
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    args = _union_args(tp)
    if args is not None:
        parts = [_value_strategy(a, default) for a in args]
        return None if any(p is None for p in parts) else st.one_of(*parts)  # type: ignore[arg-type]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _value_strategy(args[0], dataclasses.MISSING)
            return None if item is None else st.lists(item, max_size=3).map(tuple)
        items = [_value_strategy(a, dataclasses.MISSING) for a in args]
        return None if any(i is None for i in items) else st.tuples(*items)  # type: ignore[arg-type]
    if tp is bool:
        return st.booleans()
    if tp is int:
        d = default if isinstance(default, int) and not isinstance(default, bool) else 0
        return st.one_of(st.just(d), st.integers(min(0, d), max(16, 2 * abs(d))))
    if tp is float:
        d = float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else 0.0
        return st.one_of(st.just(d), st.floats(min(0.0, d), max(1.0, 2 * abs(d)), allow_nan=False))
    if tp is str:
        return st.just(default) if isinstance(default, str) else _NAME_TEXT
    return None


def field_strategies(cls: type, overrides: Mapping[str, Any] | None = None) -> dict[str, SearchStrategy[Any]]:
    """One strategy per init field of dataclass ``cls``, from its annotation and the overrides.

    Raises:
        ConfigError: ``cls`` is not a dataclass, an override is malformed, or a field without a
            default has an annotation no strategy can be derived from.
    """
    hints = typing.get_type_hints(cls)
    given = _overrides(cls, overrides or {})
    out: dict[str, SearchStrategy[Any]] = {}
    for f in _fields(cls):
        default, tp = _default(f), hints.get(f.name, Any)
        if f.name in given:
            value = given[f.name]
            if isinstance(value, SearchStrategy):
                out[f.name] = value
            elif isinstance(value, Mapping):
                out[f.name] = _range_strategy(tp, value)
            else:
                out[f.name] = st.sampled_from(list(value))
            continue
        strategy = None
        if not (issubclass(cls, PassBase) and f.name in ("targets", "ignore")):
            strategy = _value_strategy(tp, default)
        if strategy is None:
            if default is dataclasses.MISSING:
                raise ConfigError(
                    f"cannot derive values for {cls.__name__}.{f.name} (annotation {tp!r}, no default); "
                    "give it in strategy_overrides"
                )
            strategy = st.just(default)
        out[f.name] = strategy
    return out


def build_or_none(cls: type, kwargs: Mapping[str, Any]) -> Any:
    """``cls(**kwargs)``, or ``None`` when construction raises ConfigError."""
    try:
        return cls(**kwargs)
    except ConfigError:
        return None


def valid_kwargs(cls: type, overrides: Mapping[str, Any] | None = None) -> SearchStrategy[dict[str, Any]]:
    """Field dicts that construct ``cls`` without error."""
    return st.fixed_dictionaries(field_strategies(cls, overrides)).filter(lambda kw: build_or_none(cls, kw) is not None)


def _out_of_range(rng: Mapping[str, Any], kind: Any) -> list[Any]:
    lo, hi = rng.get("min_value"), rng.get("max_value")
    out: list[Any] = []
    if lo is not None:
        out.append(lo - max(1, abs(lo)) if kind is int else lo - max(1e-3, abs(lo) / 2))
        if rng.get("exclude_min"):
            out.append(lo)
    if hi is not None:
        out.append(hi + max(1, abs(hi)) if kind is int else hi + max(1e-3, abs(hi) / 2))
        if rng.get("exclude_max"):
            out.append(hi)
    if kind is float:
        out.append(math.nan)
    return [int(v) if kind is int and float(v).is_integer() else v for v in out]


def invalid_values(cls: type, overrides: Mapping[str, Any] | None = None) -> dict[str, list[Any]]:
    """For each field, values construction must reject: wrong types, and NaN or out-of-range
    values where a range override declares the field's range.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class P:
        ...     sparsity: float = 0.5
        ...     strategy_overrides = {"sparsity": {"min_value": 0.0, "max_value": 1.0, "exclude_max": True}}
        ...     def apply(self, model, ctx): ...
        >>> invalid_values(P)["sparsity"]
        [None, True, 'x', (1,), b'x', -0.001, 1.5, 1.0, nan]
    """
    hints = typing.get_type_hints(cls)
    given = _overrides(cls, overrides or {})
    out: dict[str, list[Any]] = {}
    for f in _fields(cls):
        tp = hints.get(f.name, Any)
        if issubclass(cls, PassBase) and f.name in ("targets", "ignore"):
            bad = [None, 3, [3]] + ([()] if f.name == "targets" else [])
        else:
            bad = [v for v in _WRONG if coerce(tp, v) is _MISMATCH]
        rng = given.get(f.name)
        if isinstance(rng, Mapping) and _numeric(tp) is not None:
            bad += [v for v in _out_of_range(rng, _numeric(tp)) if not any(type(v) is type(b) and v == b for b in bad)]
        if bad:
            out[f.name] = bad
    return out
