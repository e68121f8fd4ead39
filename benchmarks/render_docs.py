"""Render every full benchmark result into docs/benchmarks.md (between its markers), and the
headline table into README.md (between ``<!-- headline:begin -->`` and ``<!-- headline:end -->``).

The one exception to "full results only": the suite's own record (``run_all``) falls back to the
last ``run_all.py --quick`` run while no full suite run exists, and says so.

Run: python benchmarks/render_docs.py
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DOCS, RESULTS  # noqa: E402

BENCHMARKS = ("baseline", "calibration", "checkpoint", "core_overhead", "prune_quality", "quant_quality", "quant_speed", "qat", "distill", "structured", "run_all", "peer_llmcompressor")
README = Path(__file__).resolve().parent.parent / "README.md"


QUICK_FALLBACK = ("run_all",)  # shown from their *-quick.json while no full result exists


def result_file(name: str) -> Path:
    """The JSON file benchmark ``name``'s block is rendered from (it may not exist yet)."""
    full = RESULTS / f"{name}.json"
    quick = RESULTS / f"{name}-quick.json"
    return quick if name in QUICK_FALLBACK and not full.exists() and quick.exists() else full


def rendered(name: str) -> str:
    """The block docs/benchmarks.md must hold for benchmark ``name``."""
    module = importlib.import_module(name)
    payload = json.loads(result_file(name).read_text())
    return f"<!-- {name}:begin -->\n{module.render_markdown(payload)}\n<!-- {name}:end -->"


def headline() -> str:
    """The block README.md must hold: the headline table (benchmarks/_headline.py) from the full results."""
    import _headline

    return f"<!-- headline:begin -->\n{_headline.render()}\n<!-- headline:end -->"


def main() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in BENCHMARKS:
        if not result_file(name).exists():
            print(f"skip {name}: no results/{name}.json (run benchmarks/{name}.py)")
            continue
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + rendered(name) + tail
        print(f"rendered {name}")
    DOCS.write_text(text, encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    head, rest = readme.split("<!-- headline:begin -->", 1)
    README.write_text(head + headline() + rest.split("<!-- headline:end -->", 1)[1], encoding="utf-8")
    print("rendered the README headline")


if __name__ == "__main__":
    main()
