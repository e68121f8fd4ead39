"""Argument checks that end in "must be X (got Y)" messages.

Used by :class:`~llmslim.PassBase` to check every dataclass field against its annotation at
construction, and by pass authors for ranges and cross-field rules.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

from .errors import ConfigError

__all__ = ["fail", "check_range", "check_choice", "check_fields"]


def fail(owner: str, field: str, expected: str, got: Any) -> typing.NoReturn:
    """Raise :class:`ConfigError` saying ``owner: field must be expected (got got)``."""
    raise ConfigError(f"{owner}: {field} must be {expected} (got {got!r})")


def check_range(
    owner: str,
    field: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Check ``lo <= value <= hi`` (or strict where ``*_open``); NaN is always rejected.

    Example:
        >>> check_range("magnitude", "sparsity", 0.5, 0.0, 1.0, hi_open=True)
    """
    ok = not (isinstance(value, float) and math.isnan(value))
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        fail(owner, field, f"in {left}{lo_s}, {hi_s}{right}", value)


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    """Check that ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        fail(owner, field, "one of " + ", ".join(repr(c) for c in choices), value)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a sequence of {_describe(args[0])}"
        return "a tuple (" + ", ".join(_describe(a) for a in args) + ")"
    if origin is dict:
        return "a mapping"
    name = getattr(tp, "__name__", str(tp))
    return {"int": "an integer", "float": "a number (not NaN)", "str": "a string", "bool": "true or false"}.get(
        name, f"a {name}"
    )


_MISMATCH = object()


def coerce(tp: Any, value: Any) -> Any:
    """Return ``value`` converted to annotation ``tp`` or ``_MISMATCH``.

    Lists become tuples and ints become floats; anything not understood passes through.
    """
    origin = typing.get_origin(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return value
    if tp is type(None):
        return value if value is None else _MISMATCH
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in typing.get_args(tp)) else _MISMATCH
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = coerce(arg, value)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            return _MISMATCH
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(args[0], v) for v in value]
        elif len(args) == len(value):
            items = [coerce(a, v) for a, v in zip(args, value)]
        else:
            return _MISMATCH
        return _MISMATCH if any(i is _MISMATCH for i in items) else tuple(items)
    if origin is not None:  # dict[...], Callable[...], ... : trusted to the pass's own checks
        return value
    if tp is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return _MISMATCH
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else _MISMATCH
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _MISMATCH
    return value


def check_fields(obj: Any, owner: str, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Check and normalise every dataclass field of ``obj`` against its annotation.

    Raises:
        ConfigError: A field's value does not fit its annotation.
    """
    try:
        hints = typing.get_type_hints(type(obj))
    except NameError as exc:
        raise ConfigError(
            f"{owner}: field annotations must name module-level types so they can be checked ({exc})"
        ) from None
    for f in dataclasses.fields(obj):
        if not f.init or skip(f.name) or f.name not in hints:
            continue
        value = getattr(obj, f.name)
        out = coerce(hints[f.name], value)
        if out is _MISMATCH:
            fail(owner, f.name, _describe(hints[f.name]), value)
        if out is not value:
            object.__setattr__(obj, f.name, out)
