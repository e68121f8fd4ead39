"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace).

A block whose first line is ``# file: PATH`` is a file listing: it is written to PATH (relative to
a temporary working folder) instead of being run, so later blocks can import it. A ```toml block
with that first line is a listing too (a recipe a later block reads); every ```toml block must
parse. The site over docs/ (mkdocs.yml) lists every page and builds with ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llmslim import _registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(python|toml)\n(.*?)^```", re.S | re.M)
FILE = re.compile(r"# file: (\S+)\n")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path, monkeypatch) -> None:
    blocks = BLOCK.findall(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{path.name} has no python or toml blocks")
    monkeypatch.chdir(tmp_path)
    local = dict(_registry._local)
    names = dict(_registry._names)
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module  # dataclasses and typing look the module up by name
    namespace = module.__dict__
    try:
        for i, (lang, code) in enumerate(blocks, 1):
            listing = FILE.match(code)
            if lang == "toml":
                try:
                    tomllib.loads(code)
                except tomllib.TOMLDecodeError as exc:
                    raise AssertionError(f"{path.name}: toml block {i} does not parse: {exc}\n{code}") from None
            if listing:
                target = tmp_path / listing.group(1)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(code)
                continue
            if lang == "toml":
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


def test_mkdocs_nav_lists_every_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", config, re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert listed == pages, f"in docs/ but not in the nav: {sorted(pages - listed)}; in the nav but missing: {sorted(listed - pages)}"


def test_mkdocs_builds_strictly(tmp_path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra)")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
