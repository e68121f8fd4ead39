"""The llm-compressor peer driver skips cleanly where its venv is missing (CI never has one)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_llmcompressor  # noqa: E402


def test_missing_venv_skips_with_the_creation_commands(tmp_path, capsys) -> None:
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("peer_llmcompressor*.json")}
    assert peer_llmcompressor.main(["--quick", "--venv", str(tmp_path / "missing")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: no llm-compressor venv at")
    assert str(tmp_path / "missing") in out and "python3.11 -m venv .venv-llmcompressor" in out
    assert {p: p.stat().st_mtime_ns for p in results.glob("peer_llmcompressor*.json")} == before  # nothing written
