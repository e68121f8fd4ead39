"""The pass registry: the ``llmslim.passes`` entry-point group is the one registration path.

llmslim's own passes are declared in its own ``pyproject.toml`` table exactly like a plugin's.
Entry points are read once (names only) and loaded one at a time on first use; a name declared
twice or a plugin that fails to import raises :class:`RegistryError` naming the distribution, for
that name only: ``import llmslim`` and every other pass keep working.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata as md
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError, RegistryError

__all__ = ["GROUP", "register", "get_pass", "available_passes", "build_pass", "to_spec", "registered_name", "origin", "refresh"]

GROUP = "llmslim.passes"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")

_local: dict[str, Any] = {}  # registered in-process with register()
_loaded: dict[str, Any] = {}  # entry points loaded so far
_names: dict[Any, str] = {}  # pass class -> registered name
_eps: dict[str, list[md.EntryPoint]] | None = None

C = TypeVar("C")


def _dist(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "<unknown distribution>"


def _entry_points() -> dict[str, list[md.EntryPoint]]:
    global _eps
    if _eps is None:
        # Walk distributions ourselves: ``importlib.metadata.entry_points()`` keeps only one
        # entry point per name, which would hide a conflict between two plugins.
        found: dict[str, list[md.EntryPoint]] = {}
        seen_dists: set[str] = set()
        for dist in md.distributions():
            key = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "")).lower()
            if key in seen_dists:  # the same distribution twice on sys.path: first one wins
                continue
            seen_dists.add(key)
            for ep in dist.entry_points:
                if ep.group == GROUP:
                    found.setdefault(ep.name, []).append(ep)
        _eps = found
    return _eps


def refresh() -> None:
    """Forget what was read from entry points (after installing a plugin in this process)."""
    global _eps
    _eps = None
    for name in list(_loaded):
        _names.pop(_loaded.pop(name), None)


def available_passes() -> tuple[str, ...]:
    """Names of every registered pass, plugins included, sorted; imports nothing.

    Example:
        >>> import llmslim as ls
        >>> isinstance(ls.available_passes(), tuple)
        True
    """
    return tuple(sorted(set(_entry_points()) | set(_local)))


def _check_pass_class(obj: Any, name: str, origin: str) -> None:
    if not callable(obj) or not callable(getattr(obj, "apply", None)):
        raise RegistryError(
            f"pass {name!r} from {origin} must be a class (or factory) whose instances have apply(model, ctx) "
            f"(got {obj!r})"
        )


def get_pass(name: str) -> Any:
    """The pass class registered as ``name``, loading its entry point on first use.

    Raises:
        RegistryError: Unknown name, a name declared by two distributions, or a plugin that
            fails to import.

    Example:
        >>> import llmslim as ls
        >>> try:
        ...     ls.get_pass("nonexistent")
        ... except ls.errors.RegistryError as exc:
        ...     print(str(exc).split(";")[0])
        unknown pass 'nonexistent'
    """
    if not isinstance(name, str):
        raise RegistryError(f"pass name must be a string (got {name!r})")
    if name in _local:
        return _local[name]
    if name in _loaded:
        return _loaded[name]
    eps = _entry_points().get(name)
    if not eps:
        known = available_passes()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(f"unknown pass {name!r}{hint}; available: {', '.join(known) or '(none)'}")
    if len(eps) > 1:
        where = ", ".join(f"{ep.value} from distribution {_dist(ep)!r}" for ep in eps)
        raise RegistryError(f"pass name {name!r} is declared more than once: {where}")
    ep = eps[0]
    try:
        obj = ep.load()
    except Exception as exc:
        raise RegistryError(
            f"plugin pass {name!r} ({ep.value}) from distribution {_dist(ep)!r} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _check_pass_class(obj, name, f"distribution {_dist(ep)!r}")
    _loaded[name] = obj
    _names.setdefault(obj, name)
    return obj


def register(name: str) -> Callable[[C], C]:
    """Class decorator registering a pass in this process under ``name``.

    For passes shipped in a package, declare an entry point in the ``llmslim.passes`` group
    instead; ``register`` is for notebooks, scripts and tests.

    Raises:
        RegistryError: ``name`` is malformed or already taken (in-process or by an entry point).

    Example:
        >>> import dataclasses
        >>> import llmslim as ls
        >>> @ls.register("doc-noop")
        ... @dataclasses.dataclass
        ... class NoOp(ls.PassBase):
        ...     def apply(self, model, ctx):
        ...         return self.report(modified=False)
        >>> ls.get_pass("doc-noop") is NoOp
        True
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"pass name must be letters, digits, '_', '.', '-' (got {name!r})")

    def deco(cls: C) -> C:
        _check_pass_class(cls, name, "register()")
        if name in _local:
            raise RegistryError(f"pass name {name!r} is already registered in this process by {_local[name]!r}")
        if name in _entry_points():
            dists = ", ".join(repr(_dist(ep)) for ep in _entry_points()[name])
            raise RegistryError(f"pass name {name!r} is already declared by distribution {dists}")
        _local[name] = cls
        _names[cls] = name
        return cls

    return deco


def _unregister(name: str) -> None:
    """Remove an in-process registration (tests only)."""
    cls = _local.pop(name, None)
    if cls is not None:
        _names.pop(cls, None)


def origin(name: str) -> str:
    """Where pass ``name`` comes from: its distribution(s), or ``"(registered in process)"``."""
    if name in _local:
        return "(registered in process)"
    return ", ".join(_dist(ep) for ep in _entry_points().get(name, ()))


def registered_name(cls: Any) -> str | None:
    """The name ``cls`` is registered under, or ``None``; loads no other plugin."""
    if cls in _names:
        return _names[cls]
    value = f"{getattr(cls, '__module__', '')}:{getattr(cls, '__qualname__', '')}"
    for name, eps in _entry_points().items():
        if len(eps) != 1:
            continue
        ep_value = eps[0].value.replace(" ", "")
        module_name, _, attr = ep_value.partition(":")
        module = sys.modules.get(module_name)  # a re-export ("pkg:Class" defined in pkg.sub): no import
        if ep_value == value or (module is not None and attr and _resolve(module, attr) is cls):
            _names[cls] = name
            return name
    return None


def _resolve(module: Any, attr: str) -> Any:
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return obj


def _plain(value: Any, owner: str, field: str) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v, owner, field) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, owner, field) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(
        f"{owner}: {field} must be plain data (strings, numbers, lists) to be written to a recipe (got {value!r})"
    )


def to_spec(p: Any) -> dict[str, Any]:
    """A recipe entry for pass ``p``: ``{"pass": name, **fields that differ from their defaults}``.

    Raises:
        RegistryError: ``p``'s class is not registered.
        ConfigError: A field holds something a recipe cannot store (a type or a callable).
    """
    name = registered_name(type(p))
    if name is None:
        raise RegistryError(
            f"{type(p).__name__} is not a registered pass, so it has no recipe name: "
            "decorate it with @llmslim.register(name) or declare an entry point"
        )
    if not dataclasses.is_dataclass(p):
        raise ConfigError(f"pass {name!r}: only dataclass passes can be written to a recipe")
    spec: dict[str, Any] = {"pass": name}
    for f in dataclasses.fields(p):
        if not f.init:
            continue
        value = getattr(p, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is not dataclasses.MISSING and _same(value, default):
            continue
        spec[f.name] = _plain(value, f"pass {name!r}", f.name)
    return spec


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def build_pass(spec: Any) -> Any:
    """Build a pass from a spec: ``{"pass": name, **fields}``, a bare name, or a pass (returned as is).

    Raises:
        RegistryError: The name is unknown or its plugin is broken.
        ConfigError: The spec is malformed or a field is unknown or invalid.

    Example:
        >>> import llmslim as ls
        >>> try:
        ...     ls.build_pass({"sparsity": 0.5})
        ... except ls.errors.ConfigError as exc:
        ...     print(exc)
        pass spec must have a "pass" key naming the pass (got keys ['sparsity'])
    """
    if isinstance(spec, str):
        spec = {"pass": spec}
    if not isinstance(spec, Mapping):
        if callable(getattr(spec, "apply", None)):
            return spec
        raise ConfigError(f"pass spec must be a mapping, a pass name or a pass (got {spec!r})")
    if "pass" not in spec:
        raise ConfigError(f'pass spec must have a "pass" key naming the pass (got keys {sorted(spec)})')
    fields = {k: v for k, v in spec.items() if k != "pass"}
    cls = get_pass(spec["pass"])
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"pass {spec['pass']!r}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"fields are: {', '.join(sorted(known))}"
            )
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ConfigError(f"pass {spec['pass']!r}: {exc}") from exc
