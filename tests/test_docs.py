"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace).

A block whose first line is ``# file: PATH`` is a file listing: it is written to PATH (relative to
a temporary working folder) instead of being run, so later blocks can import it.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from llmslim import _registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FILE = re.compile(r"# file: (\S+)\n")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path, monkeypatch) -> None:
    blocks = BLOCK.findall(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    local = dict(_registry._local)
    names = dict(_registry._names)
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module  # dataclasses and typing look the module up by name
    namespace = module.__dict__
    try:
        for i, code in enumerate(blocks, 1):
            listing = FILE.match(code)
            if listing:
                target = tmp_path / listing.group(1)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(code)
                continue
            try:
                exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{path.name}: block {i} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    finally:
        sys.modules.pop(module.__name__, None)
        _registry._local.clear()
        _registry._local.update(local)
        _registry._names.clear()
        _registry._names.update(names)
        _registry.refresh()
