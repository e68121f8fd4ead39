"""The README's headline table: a few rows picked from the full result files, each naming its file.

``render_docs.py`` writes it into README.md between ``<!-- headline:begin -->`` and
``<!-- headline:end -->``; a test checks the README holds exactly this. Rows whose file (or row) is
missing are left out. Perplexity ratios are to the float32 model measured in the same file (the files
evaluate different numbers of windows, so only the ratios compare across rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _common import RESULTS, machine_line, table

DASH = "-"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _speedup(speed: dict[str, Any] | None, variant: str) -> str:
    """Decode speed of a quant_speed.json SmolLM2 variant over float32, timed interleaved in the same run."""
    smol = (speed or {}).get("results", {}).get("smollm2", {})
    if variant not in smol or "float32" not in smol:
        return DASH
    return f"{smol[variant]['decode_tokens_per_s'] / smol['float32']['decode_tokens_per_s']:.2f}x"


def rows() -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The table's rows and the payloads they come from."""
    out: list[list[Any]] = []
    used: list[dict[str, Any]] = []
    base, quant, speed = _load("baseline"), _load("quant_quality"), _load("quant_speed")
    prune, structured = _load("prune_quality"), _load("structured")
    if base:
        r = base["results"]
        out.append(["SmolLM2-135M float32", f"{r['smollm2_perplexity_default']:.2f}", "1", f"{r['smollm2_bytes'] / 1e6:.1f}", "4",
                     f"{r['smollm2_decode_tokens_per_s']:.1f} tok/s", "`baseline.json`"])
        used.append(base)
    for key, what, timed in (("rtn int8", "int8 per channel (`rtn`)", "rtn int8"),
                             ("gptq int4 g64", "int4 groups of 64 (`gptq`)", "rtn int4 g64")):
        row = (quant or {}).get("results", {}).get("smollm2", {}).get(key)
        if row and "skipped" not in row:
            same = "" if timed == key else f" ({timed}, the same packed format)"
            src = "`quant_quality.json`" + (f"; speed: `quant_speed.json`{same}" if _speedup(speed, timed) != DASH else "")
            out.append([what, f"{row['perplexity']:.2f}", f"{row['perplexity_ratio']:.3f}", f"{row['model_bytes'] / 1e6:.1f}",
                        f"{row['bytes_per_weight']:.3g}", _speedup(speed, timed), src])
            used.append(quant)
    for key, what in (("wanda-50-refit", "Wanda 50%, re-fit (`wanda`)"), ("sparsegpt-2:4-refit", "SparseGPT 2:4, re-fit (`sparsegpt`)"),
                      ("wanda-50+gptq4", "Wanda 50%, then int4 g64 (`gptq`), sparse storage")):
        row = (prune or {}).get("results", {}).get(key)
        if row:
            bpw = row.get("bytes_per_weight") or 2 * row["bytes_ratio"]  # bytes_ratio: over dense float16
            out.append([what, f"{row['perplexity']:.2f}", f"{row['perplexity'] / prune['results']['dense_perplexity']:.3f}", DASH,
                        f"{bpw:.3g}", DASH, "`prune_quality.json` (decoder-block linears)"])
            used.append(prune)
    if structured:
        r = structured["results"]
        tried = [k for k in r if k.startswith("channels-") and isinstance(r[k], dict) and "perplexity" in r[k]]
        if tried and "dense" in r:
            key = min(tried, key=lambda k: r[k]["perplexity"])
            row, decode = r[key], r[key].get("speed", {}).get("decode_speedup")
            out.append([f"25% of MLP channels removed (`channels`, {key.split('-', 1)[1]})", f"{row['perplexity']:.2f}",
                        f"{row['perplexity'] / r['dense']['perplexity']:.3f}", f"{row['params'] * 4 / 1e6:.1f}", "4",
                        f"{decode:.2f}x" if decode else DASH, "`structured.json`"])
            used.append(structured)
    return out, used


def render() -> str:
    """The README block (without its markers)."""
    body, used = rows()
    if not body:
        return "No full benchmark results yet: run `python benchmarks/run_all.py`."
    machines, cpus = [], set()
    for payload in used:  # one line per CPU: the first file measured on it
        if payload["machine"]["cpu"] not in cpus:
            cpus.add(payload["machine"]["cpu"])
            machines.append(machine_line(payload))
    head = ["SmolLM2-135M-Instruct", "perplexity", "x float32", "model MB", "bytes / weight", "decode", "from `benchmarks/results/`"]
    return (
        table(head, body) + "\n\n"
        "Perplexity on the docs-text evaluation split; `x float32` is the ratio to the float32 model in the same file "
        "(the files score different numbers of windows). Bytes per weight: the compressed linear layers "
        "(float32 = 4). Decode: batch-1 greedy tokens/s, or the speed-up over float32 timed in the same run. "
        "Details, peers and every other configuration: [docs/benchmarks.md](docs/benchmarks.md).\n\n"
        + " ".join(machines)
    )
