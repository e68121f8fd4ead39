"""Recipes: lists of pass specs as data, read from dicts, JSON or TOML, written to either."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["read_recipe", "write_recipe", "dumps_toml"]


def _load_toml(text: str, where: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {where} must be valid TOML ({exc})") from None


def read_recipe(source: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Return a recipe dict ``{"passes": [spec, ...], ...}`` from a dict, or a ``.json``/``.toml`` file.

    Raises:
        ConfigError: The file is missing or malformed, or has no ``passes`` list.
    """
    if isinstance(source, Mapping):
        data = dict(source)
        where = "dict"
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"recipe file {where} must be readable ({exc.strerror or exc})") from None
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"recipe {where} must be valid JSON ({exc})") from None
        elif path.suffix.lower() == ".toml":
            data = _load_toml(text, where)
        else:
            raise ConfigError(f"recipe file must end in .json or .toml (got {where!r})")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {where} must be a table with a 'passes' list (got {type(data).__name__})")
    passes = data.get("passes")
    if not isinstance(passes, list) or not all(isinstance(p, (dict, str)) for p in passes):
        raise ConfigError(f"recipe {where}: 'passes' must be a list of pass tables (got {passes!r})")
    unknown = sorted(set(data) - {"passes", "name"})
    if unknown:
        raise ConfigError(f"recipe {where}: unknown top-level key(s) {unknown}; allowed: 'passes', 'name'")
    return data


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v, where)}" for k, v in value.items())
        return "{" + items + "}"
    if value is None:
        raise ConfigError(f"{where} is None, which TOML cannot store; use a JSON recipe or leave the default")
    raise ConfigError(f"{where} must be plain data to be written as TOML (got {value!r})")


def dumps_toml(recipe: Mapping[str, Any]) -> str:
    """Render a recipe dict as TOML (``[[passes]]`` tables)."""
    lines = []
    if "name" in recipe:
        lines += [f"name = {_toml_value(recipe['name'], 'recipe name')}", ""]
    for spec in recipe["passes"]:
        lines.append("[[passes]]")
        for key, value in spec.items():
            lines.append(f"{json.dumps(key) if not key.isidentifier() else key} = {_toml_value(value, f'field {key!r}')}")
        lines.append("")
    return "\n".join(lines)


def write_recipe(recipe: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``recipe`` to ``path`` (``.json`` or ``.toml``) atomically; return the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(recipe, indent=2) + "\n"
    elif suffix == ".toml":
        text = dumps_toml(recipe)
    else:
        raise ConfigError(f"recipe file must end in .json or .toml (got {str(path)!r})")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
