"""llmslim-nm-prune: N:M semi-structured pruning as an llmslim pass (an example plugin)."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Literal

import torch
from torch import nn

import llmslim as ls
from llmslim.errors import ConfigError

__all__ = ["NMPrune"]


@dataclasses.dataclass
class NMPrune(ls.PassBase):
    """Keep the N largest of every M consecutive weights along the input dimension (N:M sparsity)."""

    pattern: str = "2:4"
    score: Literal["magnitude", "random"] = "magnitude"

    accepts = ("Linear", "Conv2d")
    edits_in_place = True  # zeroes weights in place: PassBase.modules journals each module first
    rejects_after = {"packed": "N:M pruning needs float weights; prune before quantizing"}
    # Plain data (no hypothesis import here): the patterns llmslim.testing draws configs from.
    strategy_overrides = {"pattern": ["1:2", "2:4", "1:4", "4:8"]}

    def validate(self) -> None:
        match = re.fullmatch(r"(\d+):(\d+)", self.pattern)
        if match is None or not 0 < int(match[1]) <= int(match[2]):
            raise ConfigError(f"{self.label}: pattern must be 'N:M' with 0 < N <= M (got {self.pattern!r})")

    @property
    def n_m(self) -> tuple[int, int]:
        """``(N, M)`` from ``pattern``."""
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def apply(self, model: nn.Module, ctx: ls.Context) -> ls.Report:
        n, m = self.n_m
        generator = torch.Generator().manual_seed(ctx.seed)  # randomness from the Context's seed
        rows = []
        for name, module in self.modules(model, ctx):
            start, before = time.perf_counter(), self.measure(module)
            with torch.no_grad():
                weight = module.weight.view(module.weight.shape[0], -1)  # (out, in * kernel)
                if self.score == "magnitude":
                    score = weight.abs()
                else:
                    score = torch.rand(weight.shape, generator=generator)
                for lo in range(0, weight.shape[1], m):  # the last group may be shorter than M
                    group = score[:, lo : lo + m]
                    drop = group.shape[1] - min(n, group.shape[1])
                    if drop:
                        smallest = group.argsort(dim=1)[:, :drop]
                        weight[:, lo : lo + m].scatter_(1, smallest, 0.0)
            rows.append(self.row(name, module, before, started=start, pattern=self.pattern))
        return self.report(rows)
