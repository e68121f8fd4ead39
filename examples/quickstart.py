"""Quickstart: write a pass, chain it, read the Report, save the recipe.

Run: python examples/quickstart.py

The pass families (quantization, pruning, distillation) arrive as registered passes; this
example defines its own small pass on ``PassBase`` so it runs on the core alone.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from torch import nn

import llmslim as ls
from llmslim._validate import check_range


@ls.register("example-magnitude")
@dataclasses.dataclass
class ExampleMagnitude(ls.PassBase):
    """Zero the smallest-magnitude fraction of each targeted weight (example pass)."""

    sparsity: float = 0.5
    edits_in_place = True  # weights change in place: journal them so a failure rolls back

    def validate(self) -> None:
        check_range(self.label, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)

    def apply(self, model: nn.Module, ctx: ls.Context) -> ls.Report:
        rows = []
        for name, module in self.modules(model, ctx):
            before = self.measure(module)
            w = module.weight
            k = int(self.sparsity * w.numel())
            with torch.no_grad():
                w.view(-1)[w.abs().flatten().argsort()[:k]] = 0.0
            rows.append(self.row(name, module, before))
        return self.report(rows)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10))
    x = torch.randn(8, 64)
    reference = model(x)

    report = ls.compress_(model, ExampleMagnitude(sparsity=0.5, ignore=("4",)), progress=False)
    print(report)
    drift = (model(x) - reference).norm() / reference.norm()
    print(f"\nrelative output change: {drift:.3f}")

    # The same chain as data: a recipe file that `llmslim recipe check` validates.
    manager = ls.PassManager([ExampleMagnitude(sparsity=0.5, ignore=("4",))])
    with tempfile.TemporaryDirectory() as tmp:
        path = manager.save_recipe(Path(tmp) / "recipe.toml")
        print(f"\nrecipe written:\n{path.read_text()}")
        assert ls.PassManager.from_recipe(path) == manager

    # Bad input fails loudly, before any work, naming the pass and the value.
    try:
        ExampleMagnitude(sparsity=1.5)
    except ls.errors.ConfigError as exc:
        print(f"ConfigError: {exc}")


if __name__ == "__main__":
    main()
