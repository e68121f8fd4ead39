"""docs/benchmarks.md shows exactly what the result JSON files say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_docs  # noqa: E402


@pytest.mark.parametrize("name", render_docs.BENCHMARKS)
def test_docs_table_matches_its_json(name) -> None:
    if not render_docs.result_file(name).exists():
        pytest.skip(f"no results/{name}.json yet")
    assert render_docs.rendered(name) in (ROOT / "docs" / "benchmarks.md").read_text()


def test_every_result_file_has_a_renderer() -> None:
    names = {p.stem for p in (ROOT / "benchmarks" / "results").glob("*.json") if not p.stem.endswith("-quick")}
    assert names <= set(render_docs.BENCHMARKS)


def test_readme_headline_matches_the_json() -> None:
    assert render_docs.headline() in (ROOT / "README.md").read_text(encoding="utf-8")
