"""Render every full benchmark result into docs/benchmarks.md (between its markers).

Run: python benchmarks/render_docs.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DOCS, RESULTS, load_result  # noqa: E402

BENCHMARKS = ("baseline", "calibration", "checkpoint", "core_overhead", "prune_quality", "quant_quality", "quant_speed", "qat", "distill", "structured")


def rendered(name: str) -> str:
    """The block docs/benchmarks.md must hold for benchmark ``name``."""
    module = importlib.import_module(name)
    return f"<!-- {name}:begin -->\n{module.render_markdown(load_result(name))}\n<!-- {name}:end -->"


def main() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in BENCHMARKS:
        if not (RESULTS / f"{name}.json").exists():
            print(f"skip {name}: no results/{name}.json (run benchmarks/{name}.py)")
            continue
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + rendered(name) + tail
        print(f"rendered {name}")
    DOCS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
