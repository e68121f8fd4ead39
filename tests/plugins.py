"""Build throwaway plugin distributions (a ``*.dist-info`` with ``entry_points.txt``) on sys.path."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from llmslim import _registry


@contextmanager
def plugin(
    root: Path, dist: str, modules: Mapping[str, str], entry_points: Mapping[str, str]
) -> Iterator[Path]:
    """Install distribution ``dist`` (modules + entry points) under ``root`` for the block's duration."""
    where = root / dist
    where.mkdir(parents=True)
    for name, source in modules.items():
        (where / f"{name}.py").write_text(textwrap.dedent(source))
    info = where / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[llmslim.passes]\n{lines}")
    sys.path.insert(0, str(where))
    _registry.refresh()
    try:
        yield where
    finally:
        sys.path.remove(str(where))
        for name in modules:
            sys.modules.pop(name, None)
        _registry.refresh()
