"""Two toy passes that exercise the core (the real pass families come in later issues).

* ``toy-prune``: zeroes the smallest-magnitude fraction of each targeted weight, in place.
* ``toy-half``: swaps each ``nn.Linear`` for :class:`HalfLinear`, which stores float16 weights
  (a real module swap that halves the bytes); declares ``produces={"packed"}``, and
  ``toy-prune`` declares it cannot run after that.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

import llmslim as ls
from llmslim._validate import check_range
from llmslim.calibration import CalibrationPass


class HalfLinear(nn.Module):
    """A linear layer that stores its weight in float16 and computes in the input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_half", linear.weight.detach().to(torch.float16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_bits = 16.0
        # Replaces the count of its own parameters: the weights it represents plus the bias.
        self.logical_params = self.weight_half.numel() + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_half.to(x.dtype), self.bias)


@dataclasses.dataclass
class ToyPrune(ls.PassBase):
    """Zero the smallest-magnitude fraction of each targeted weight (test toy)."""

    sparsity: float = 0.5
    fail_at: int | None = None  # raise on the k-th module (rollback tests)

    produces = frozenset({"masks"})
    rejects_after = {"packed": "weights are packed; prune before quantizing"}
    accepts = ("Linear", "Conv2d")
    edits_in_place = True

    def validate(self) -> None:
        check_range(self.label, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)

    def apply(self, model: nn.Module, ctx: ls.Context) -> ls.Report:
        rows = []
        for i, (name, module) in enumerate(self.modules(model, ctx)):
            start, before = time.perf_counter(), self.measure(module)
            w = module.weight
            k = int(self.sparsity * w.numel())
            with torch.no_grad():
                if k:
                    idx = w.abs().flatten().argsort()[:k]
                    w.view(-1)[idx] = 0.0
            if self.fail_at is not None and i == self.fail_at:
                raise RuntimeError(f"injected failure at module {i}")
            rows.append(self.row(name, module, before, started=start))
        return self.report(rows)


@dataclasses.dataclass
class ToyHalf(ls.PassBase):
    """Store Linear weights in float16 by swapping in HalfLinear (test toy)."""

    fail_at: int | None = None

    produces = frozenset({"packed"})
    accepts = ("Linear",)

    def apply(self, model: nn.Module, ctx: ls.Context) -> ls.Report:
        rows = []
        for i, (name, module) in enumerate(self.modules(model, ctx)):
            if not name:
                continue  # the root cannot be swapped in place: leave a bare Linear model alone
            before = self.measure(module)
            new = HalfLinear(module)
            ls.replace_module_(model, name, new)
            if self.fail_at is not None and i == self.fail_at:
                raise RuntimeError(f"injected failure at module {i}")
            rows.append(self.row(name, new, before))
        return self.report(rows)


@dataclasses.dataclass
class ToyWanda(CalibrationPass):
    """Zero the lowest |w| x ||x_j|| fraction of each row, from calibration statistics (test toy)."""

    sparsity: float = 0.5

    produces = frozenset({"masks"})
    rejects_after = {"packed": "weights are packed; prune before quantizing"}
    accepts = ("Linear", "Conv1D", "Conv2d")
    edits_in_place = True

    def validate(self) -> None:
        check_range(self.label, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"sqsum"}

    def solve(self, name: str, module: nn.Module, stats, ctx: ls.Context) -> ls.ModuleRow:
        start, before = time.perf_counter(), self.measure(module)
        transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores [in, out]
        w = module.weight.T if transposed else module.weight.reshape(module.weight.shape[0], -1)
        score = w.detach().abs() * stats.channel_norms()[None, :]
        k = int(self.sparsity * w.shape[1])
        with torch.no_grad():
            if k:
                drop = score.argsort(dim=1, stable=True)[:, :k]
                mask = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
                module.weight.mul_((mask.T if transposed else mask.reshape(module.weight.shape)).to(w.dtype))
        return self.row(name, module, before, started=start)


TOYS = {"toy-prune": ToyPrune, "toy-half": ToyHalf, "toy-wanda": ToyWanda}


def register_toys() -> None:
    """Register the toys in this process (idempotent)."""
    from llmslim import _registry

    for name, cls in TOYS.items():
        if _registry._local.get(name) is not cls:
            ls.register(name)(cls)
