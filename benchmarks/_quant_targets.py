"""Issue 6's quality and size targets, evaluated on ``quant_quality.py``'s results.

Each target is ``{"target", "measured", "met"}``; ``met`` is ``True``/``False``, or a string
saying why it was not measured (a row not run).
"""

from __future__ import annotations

from typing import Any

GPTQ_SECONDS = 180.0  # 128 windows of 512 tokens


def _ran(rows: dict[str, Any], name: str) -> dict[str, Any] | None:
    row = rows.get(name)
    return row if row and "skipped" not in row else None


def _best(rows: dict[str, Any], prefix: str, needle: str, key: str, lowest: bool) -> tuple[str, float] | None:
    found = [(n, r[key]) for n, r in rows.items() if n.startswith(prefix) and needle in n and "skipped" not in r]
    return (min if lowest else max)(found, key=lambda t: t[1]) if found else None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets table: every target, its measured figure, met or not."""
    sm, mini = results.get("smollm2", {}), results.get("minilm", {})
    out: list[dict[str, Any]] = []

    def add(target: str, measured: Any, met: Any) -> None:
        out.append({"target": target, "measured": measured, "met": met})

    def at_most(target: str, name: str, key: str, limit: float) -> None:
        row = _ran(sm, name)
        if row is None or row.get(key) is None:
            add(target, "-", "not run")
        else:
            add(target, f"{row[key]:.4g}", row[key] <= limit)

    at_most("gptq int4 g64 perplexity <= 1.10x float32", "gptq int4 g64", "perplexity_ratio", 1.10)
    # every torchao row at g64 is an int4 one (its HQQ parameters included)
    gptq, peer = _ran(sm, "gptq int4 g64"), _best(sm, "torchao", "g64", "perplexity_ratio", lowest=True)
    if gptq is None or peer is None:
        add("gptq int4 g64 better than torchao's best int4 g64", "-", "not run")
    else:
        add("gptq int4 g64 better than torchao's best int4 g64", f"{gptq['perplexity_ratio']:.4g} vs {peer[1]:.4g} ({peer[0]})",
            gptq["perplexity_ratio"] < peer[1])
    at_most("gptq int4 g128 perplexity <= 1.15x", "gptq int4 g128", "perplexity_ratio", 1.15)
    at_most("gptq int3 g128 perplexity <= 3x", "gptq int3 g128", "perplexity_ratio", 3.0)
    timed = _ran(results.get("ablation", {}), "calibration=128")
    if timed is None:
        add("gptq int4 g64, 128x512 calibration, < 3 min", "-", "not run")
    else:
        add("gptq int4 g64, 128x512 calibration, < 3 min", f"{timed['seconds']:.0f} s", timed["seconds"] < GPTQ_SECONDS)
    at_most("int8 weight-only (rtn, default float32 scales) perplexity within 0.5%", "rtn int8", "perplexity_ratio", 1.005)
    at_most("bytes/weight gptq int4 g128 <= 0.56", "gptq int4 g128", "bytes_per_weight", 0.56)
    at_most("bytes/weight gptq int4 g64 <= 0.59", "gptq int4 g64", "bytes_per_weight", 0.59)
    at_most("bytes/weight int8 <= 1.02", "rtn int8", "bytes_per_weight", 1.02)
    at_most("smoothquant+w8a8 perplexity within 2%", "smoothquant+w8a8", "perplexity_ratio", 1.02)
    at_most("fp8 perplexity within 1%", "fp8", "perplexity_ratio", 1.01)
    ours, theirs = _ran(mini, "gptq int4 g64"), _best(mini, "torchao", "g64", "fidelity", lowest=False)
    if ours is None or theirs is None:
        add("MiniLM: gptq int4 g64 at least as faithful as torchao's int4", "-", "not run")
    else:
        add("MiniLM: gptq int4 g64 at least as faithful as torchao's int4", f"{ours['fidelity']:.5f} vs {theirs[1]:.5f} ({theirs[0]})",
            ours["fidelity"] >= theirs[1])
    return out
