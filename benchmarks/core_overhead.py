"""What the core costs: import time, plan check, rollback journal (vs copying the whole model).

Run:  python benchmarks/core_overhead.py [--quick]
Prints a table and writes benchmarks/results/core_overhead[-quick].json.

The model is a LLaMA-shaped stack of nn.Linear layers with SmolLM2-135M's shapes (30 blocks,
hidden 576, MLP 1536, 3 key/value heads of 64, vocabulary 49152), so the journal sees the same
module tree and bytes as the real model without needing transformers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import llmslim as ls
from llmslim._rollback import Journal

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- core_overhead:begin -->", "<!-- core_overhead:end -->"


class Block(nn.Module):
    def __init__(self, d: int = 576, kv: int = 192, ff: int = 1536) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = nn.Linear(d, d, False), nn.Linear(d, kv, False), nn.Linear(d, kv, False), nn.Linear(d, d, False)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, ff, False), nn.Linear(d, ff, False), nn.Linear(ff, d, False)
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)


class LlamaShaped(nn.Module):
    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(49152, 576)
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.norm = nn.RMSNorm(576)


@dataclasses.dataclass
class ScaleInPlace(ls.PassBase):
    """Edits every targeted weight in place (journal copies each module as it is reached)."""

    edits_in_place = True

    def apply(self, model, ctx):
        for _, module in self.modules(model, ctx):
            with torch.no_grad():
                module.weight.mul_(0.5)
        ctx.rollback_bytes = ctx.journal.saved_bytes
        raise RuntimeError("injected failure after the last module")


@dataclasses.dataclass
class SwapModules(ls.PassBase):
    """Replaces every targeted module (journal keeps references only)."""

    def apply(self, model, ctx):
        for name, module in self.modules(model, ctx):
            ls.replace_module_(model, name, nn.Linear(module.in_features, module.out_features, False, device="meta"))
        ctx.rollback_bytes = ctx.journal.saved_bytes
        raise RuntimeError("injected failure after the last module")


@dataclasses.dataclass
class Tagged(ls.PassBase):
    """A no-op pass for plan checks."""

    produces = frozenset({"masks"})
    rejects_after = {"packed": "weights are packed"}

    def apply(self, model, ctx):
        return self.report(modified=False)


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def import_cost(repeat: int) -> float:
    code = "import time, torch; t = time.perf_counter(); import llmslim; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(repeat)]
    return statistics.median(runs)


def failing_run(model: nn.Module, p: ls.PassBase) -> tuple[float, int]:
    ctx = ls.Context(progress=False)
    t = time.perf_counter()
    try:
        ls.compress_(model, p, ctx=ctx)
    except ls.errors.PassError as exc:
        assert exc.rolled_back
    return time.perf_counter() - t, ctx.rollback_bytes


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "llmslim": ls.__version__}


def render_markdown(payload: dict) -> str:
    """The docs table for one result file (docs/benchmarks.md holds exactly this)."""
    m = payload["machine"]
    lines = [
        f"Measured on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
        f"{payload['settings']['blocks']} blocks (`benchmarks/results/core_overhead.json`).",
        "",
        "| measure | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in payload["results"].items()]
    return "\n".join(lines)


def write_docs(payload: dict) -> None:
    """Replace the table between the markers in docs/benchmarks.md."""
    text = DOCS.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{render_markdown(payload)}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 blocks instead of 30, fewer repeats")
    parser.add_argument("--write-docs", action="store_true", help="render the full run's JSON into docs/benchmarks.md and exit")
    args = parser.parse_args()
    if args.write_docs:
        write_docs(json.loads((RESULTS / "core_overhead.json").read_text()))
        return
    n_layers, repeat = (4, 3) if args.quick else (30, 5)

    torch.manual_seed(0)
    model = LlamaShaped(n_layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model_mb = ls.model_bytes(model) / 2**20

    chain = ls.PassManager([Tagged(name=f"p{i}") for i in range(13)])
    rows = {
        "import llmslim after torch (s)": import_cost(repeat),
        "plan check, 13 passes (ms)": median_time(chain.check, 200) * 1e3,
        "journal snapshot, whole model (ms)": median_time(lambda: Journal(model), repeat) * 1e3,
        "deepcopy of the model (ms)": median_time(lambda: copy.deepcopy(model), repeat) * 1e3,
    }
    swap_s, swap_bytes = failing_run(model, SwapModules())
    inplace_s, inplace_bytes = failing_run(model, ScaleInPlace())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "rollback was not bit-identical"
    rows.update(
        {
            "module-swap pass, failed + rolled back (s)": swap_s,
            "module-swap pass, rollback copies held (MiB)": swap_bytes / 2**20,
            "in-place pass, failed + rolled back (s)": inplace_s,
            "in-place pass, rollback copies held (MiB)": inplace_bytes / 2**20,
            "model size (MiB)": model_mb,
        }
    )
    width = max(map(len, rows))
    print(f"core overhead on a LLaMA-shaped model, {n_layers} blocks, {model_mb:.0f} MiB float32")
    for k, v in rows.items():
        print(f"{k.ljust(width)}  {v:10.3f}")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"core_overhead{'-quick' if args.quick else ''}.json"
    payload = {"benchmark": "core_overhead", "machine": machine(), "settings": {"blocks": n_layers, "repeat": repeat}, "results": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
