"""docs/benchmarks.md shows exactly what the result JSON files say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_core_overhead_table_matches_its_json() -> None:
    bench = _load("core_overhead")
    payload = json.loads((ROOT / "benchmarks" / "results" / "core_overhead.json").read_text())
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert f"{bench.BEGIN}\n{bench.render_markdown(payload)}\n{bench.END}" in docs
    assert payload["results"]["module-swap pass, rollback copies held (MiB)"] == 0.0
