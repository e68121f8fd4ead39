"""What the core costs: import time, plan check, rollback journal (vs copying the whole model).

Run:  python benchmarks/core_overhead.py [--quick]; then python benchmarks/render_docs.py
Prints a table and writes benchmarks/results/core_overhead[-quick].json.

The model is a LLaMA-shaped stack of nn.Linear layers with SmolLM2-135M's shapes (30 blocks,
hidden 576, MLP 1536, 3 key/value heads of 64, vocabulary 49152), so the journal sees the same
module tree and bytes as the real model without needing transformers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmslim as ls  # noqa: E402
from _common import machine_line, median_time, print_table, table, write_result  # noqa: E402
from llmslim._rollback import Journal  # noqa: E402


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


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    rows = [[k, v] for k, v in payload["results"].items()]
    return f"{machine_line(payload)} {payload['settings']['blocks']} blocks.\n\n" + table(["measure", "value"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 blocks instead of 30, fewer repeats")
    args = parser.parse_args()
    n_layers, repeat = (4, 3) if args.quick else (30, 5)

    torch.manual_seed(0)
    model = LlamaShaped(n_layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model_mb = ls.model_bytes(model) / 2**20

    chain = ls.PassManager([Tagged(name=f"p{i}") for i in range(13)])
    rows = {
        "import llmslim after torch (s)": import_cost(repeat),
        "plan check, 13 passes (ms)": median_time(chain.check, repeat=200) * 1e3,
        "journal snapshot, whole model (ms)": median_time(lambda: Journal(model), repeat=repeat) * 1e3,
        "deepcopy of the model (ms)": median_time(lambda: copy.deepcopy(model), repeat=repeat) * 1e3,
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
    print_table(f"core overhead, LLaMA-shaped model, {n_layers} blocks, {model_mb:.0f} MiB float32", ["measure", "value"], [[k, v] for k, v in rows.items()])
    print(f"wrote {write_result('core_overhead', {'blocks': n_layers, 'repeat': repeat}, rows, quick=args.quick)}")


if __name__ == "__main__":
    main()
