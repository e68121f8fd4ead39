"""benchmarks/plots.py: the points it reads from the result files, the Pareto front, and (with
matplotlib) the PNG files it writes from the checked-in JSON, byte for byte the same twice."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import plots  # noqa: E402


def _payload(results: dict) -> dict:
    return {"benchmark": "x", "machine": {}, "settings": {}, "results": results}


def test_quality_points_ratio_bytes_and_peers() -> None:
    quant = _payload({"float32": {"perplexity": 10.0}, "smollm2": {
        "rtn int4 g64": {"config": {"method": "rtn"}, "perplexity": 12.0, "perplexity_ratio": 1.2, "bytes_per_weight": 0.5625},
        "torchao int8": {"config": {"method": "torchao"}, "perplexity": 10.1, "perplexity_ratio": 1.01, "bytes_per_weight": 1.0},
        "torchao int4": {"config": {"method": "torchao"}, "skipped": "no CPU path"},
        "simulated": {"config": {"method": "torchao-hqq"}, "perplexity": 11.0, "perplexity_ratio": 1.1, "bytes_per_weight": None},
    }, "ablation": {"damp=0.1": {"perplexity": 11.0, "perplexity_ratio": 1.1, "bytes_per_weight": 0.5625}}})
    prune = _payload({"dense_perplexity": 20.0,
                      "wanda-50": {"perplexity": 30.0, "bytes_ratio": 0.5625, "storage": ["bitmask"]},
                      "torch-l1-50": {"perplexity": 400.0, "bytes_ratio": None, "storage": ["dense"]},
                      "wanda-50+gptq4": {"perplexity": 40.0, "bytes_per_weight": 0.42, "bytes_ratio": 0.21}})
    points, left = plots.quality_points({"quant_quality": quant, "prune_quality": prune})
    by = {p.label: p for p in points}
    assert set(by) == {"float32", "rtn int4 g64", "torchao int8", "wanda-50", "torch-l1-50", "wanda-50+gptq4"}
    assert left == ["quant_quality: simulated (no size)"]
    assert by["wanda-50"].bytes_per_weight == 1.125 and by["wanda-50"].ratio == 1.5  # float16 values + bitmask; 30 / 20
    assert by["torch-l1-50"].bytes_per_weight == 4.0 and by["torch-l1-50"].peer
    assert by["torchao int8"].peer and not by["rtn int4 g64"].peer
    assert by["wanda-50+gptq4"].family == "sparse + int4"
    front = [p.label for p in plots.pareto(points)]
    assert front == ["wanda-50+gptq4", "rtn int4 g64", "torchao int8", "float32"]


def test_speed_series_from_the_checked_in_json() -> None:
    payload = json.loads((ROOT / "benchmarks" / "results" / "quant_speed.json").read_text())
    series = {s.name: s for s in plots.speed_series(payload)}
    decode = series["SmolLM2 decode"].points
    assert [b for b, _ in decode] == [4.0, 8.0, 32.0] and decode[-1] == (32.0, 1.0)  # drawn left to right
    assert all(s.group in series for s in series.values())


def test_layer_error_series_groups_by_block() -> None:
    prune = _payload({"sparsegpt-50": {"perplexity": 1.0, "layer_errors": {
        "model.layers.0.mlp.up_proj": 0.1, "model.layers.0.mlp.down_proj": 0.3, "model.layers.1.mlp.up_proj": 0.5}}})
    assert plots.layer_error_series({"prune_quality": prune}) == {"prune_quality: sparsegpt-50": [(0, 0.2), (1, 0.5)]}


def test_plots_from_the_checked_in_json(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the plot extra)")
    written = plots.main(["--out", str(tmp_path / "a")])
    assert {p.name for p in written} >= {"quality_vs_bytes.png", "speedup_vs_bits.png"}
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"Software" not in p.read_bytes()  # no tool or date stamps: the same bytes on every run
    again = plots.main(["--out", str(tmp_path / "b")])
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in again]


def test_the_per_layer_plot_when_a_row_records_errors(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the plot extra)")
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "benchmarks" / "results" / "quant_speed.json", results)
    prune = _payload({"dense_perplexity": 10.0, "sparsegpt-50": {
        "perplexity": 12.0, "bytes_ratio": 0.5625, "layer_errors": {f"model.layers.{i}.mlp.up_proj": 0.1 * i for i in range(4)}}})
    (results / "prune_quality.json").write_text(json.dumps(prune))
    written = plots.main(["--out", str(tmp_path / "img"), "--results", str(results)])
    assert sorted(p.name for p in written) == ["layer_error.png", "quality_vs_bytes.png", "speedup_vs_bits.png"]


def test_docs_embed_the_plots_that_exist() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for name in ("quality_vs_bytes.png", "speedup_vs_bits.png"):
        assert f"(img/{name})" in text and (ROOT / "docs" / "img" / name).exists()
