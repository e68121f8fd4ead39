"""Shared benchmark conventions: timing, machine description, result files, docs rendering.

* Timing: warm-up runs first, then the median of repeated runs; several candidates are timed
  interleaved (A, B, A, B, ...) so a noisy machine slows them alike and ratios stay fair.
* Every run writes ``results/<name>.json`` (``<name>-quick.json`` with ``--quick``) holding the
  machine, versions, settings and results.
* ``docs/benchmarks.md`` shows each full result through the script's ``render_markdown``,
  between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers (``render_docs.py``).
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs" / "benchmarks.md"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def median_time(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    return interleaved({"fn": fn}, warmup=warmup, repeat=repeat)["fn"]


def interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Median wall seconds of each function, timed round-robin so they share the machine's noise."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def read_bandwidth(megabytes: int = 512, repeat: int = 5) -> float:
    """This machine's memory read bandwidth in bytes per second: the median time of summing a
    float32 tensor far larger than the caches (the rate a weight-streaming GEMV can reach)."""
    import torch

    x = torch.ones(megabytes * (1 << 20) // 4)
    seconds = median_time(lambda: x.sum(), warmup=1, repeat=repeat)
    return x.numel() * 4 / seconds


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, ISA flags, threads and package versions of this run."""
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return {
        "cpu": cpu,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "llmslim", "transformers", "torchao", "torch-pruning")},
        "date": datetime.date.today().isoformat(),
    }


def write_result(name: str, settings: Mapping[str, Any], results: Mapping[str, Any], *, quick: bool) -> Path:
    """Write ``results/<name>[-quick].json`` atomically; return its path."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    payload = {"benchmark": name, "quick": quick, "machine": machine(), "settings": dict(settings), "results": dict(results)}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def machine_line(payload: Mapping[str, Any]) -> str:
    m = payload["machine"]
    isa = ", ".join(m.get("isa", [])) or "no AVX2"
    return (
        f"Measured on {m['cpu']} ({isa}), {m['threads']} thread{'' if m['threads'] == 1 else 's'}, torch {m['versions']['torch']}, "
        f"{m['date']} — `benchmarks/results/{payload['benchmark']}{'-quick' if payload.get('quick') else ''}.json`."
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get 4 significant digits, the first column is left-aligned."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """The console version of :func:`table`."""
    text = [[str(h) for h in header]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    print(title)
    for r in text:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
