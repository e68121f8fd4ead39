"""The ``qat`` pass: quantization-aware training through a fake-quantization parametrization."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._context import Context
from .._pass import PassBase
from .._report import ModuleRow, Report
from .._targets import replace_module_
from ..errors import ConfigError, TargetError
from ._fakequant import FakeQuant, get_fake_quant, pre_quant_weight
from ._functional import dequantize, relative_error
from ._grid import GridFields
from ._sparse import quantized_layer

__all__ = ["QAT"]


def _transposed(module: nn.Module) -> bool:
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__)


@dataclasses.dataclass
class QAT(GridFields, PassBase):
    """Quantization-aware training: train through fake-quantized weights, then pack them.

    ``apply`` puts a :class:`~llmslim.quant.FakeQuant` parametrization on each target's weight:
    every forward sees ``dequantize(quantize(w))`` on a min/max grid recomputed from the current
    weight, and the gradient passes straight through to the float weight, which any optimizer
    keeps training (the ``Parameter`` object does not change). ``step`` does nothing (there are no
    observers: the grid follows the weight). ``finalize`` replaces each layer with a
    :class:`~llmslim.quant.QuantLinear` holding exactly the codes the last forward used, so the
    packed model computes the fake-quantized weight.

    A pruning mask already on a weight (``llmslim.prune``, applied and not yet finalized) stays
    active: the fake quantization comes after it in the parametrization chain, so it quantizes
    the masked weight, and pruned weights stay exactly zero (both grids hold 0.0). Prune before
    QAT, not after (the plan check rejects pruning after it).

    Args:
        bits: Code width: 2, 3, 4 or 8.
        group_size: Input columns per scale (a shorter last group where it does not divide the
            row), or ``None`` for one scale per output channel.
        symmetric: Symmetric grid, or asymmetric with int8 zero points.
        scale_dtype: ``"auto"`` (float32 at 8 bits, bfloat16 below), ``"bfloat16"``,
            ``"float16"`` or ``"float32"`` (scales are rounded to it in training too, so
            finalize matches).
        storage: What ``finalize`` leaves: ``"packed"`` (every code, the CPU int4/int8 kernels)
            or ``"sparse"`` (a :class:`~llmslim.quant.SparseQuantLinear` storing only the
            non-zero codes of a pruned weight, where that is smaller; else packed).
        targets / ignore / name: As :class:`~llmslim.PassBase`; ``lm_head`` is ignored by default.

    Raises:
        ConfigError: A bad setting (``bits=5``, ``group_size=0`` ...).

    Example:
        >>> import llmslim as ls
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> qat = ls.PassManager([QAT(bits=4, group_size=32)])
        >>> ctx = ls.Context(progress=False)
        >>> _ = qat.apply(model, ctx)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> loss = model(torch.randn(16, 64)).square().mean()
        >>> loss.backward(); optimizer.step(); qat.step(model, ctx)
        >>> fake = model(torch.ones(1, 64)).detach()
        >>> _ = qat.finalize(model, ctx)
        >>> type(model[0]).__name__, torch.allclose(model(torch.ones(1, 64)), fake, atol=0.05)
        ('QuantLinear', True)
    """


    storage: Literal["packed", "sparse"] = "packed"

    produces: ClassVar[frozenset[str]] = frozenset({"packed"})  # after finalize; pruning must come first
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    strategy_overrides: ClassVar[Mapping[str, Any]] = {"group_size": [None, 1, 3, 8, 16, 32, 48, 64, 128]}

    def fake_quant(self, module: nn.Module) -> FakeQuant:
        """The parametrization this pass puts on ``module.weight``."""
        return FakeQuant(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                         scale_dtype=self.scales_dtype(), transposed=_transposed(module))

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Fake-quantize every target's weight (after any pruning mask on it)."""
        rows: list[ModuleRow] = []
        masked = 0
        for name, module in self.modules(model, ctx):
            started, before = time.perf_counter(), self.measure(module)
            if get_fake_quant(module) is not None:
                raise ConfigError(f"{self.label}: module {name!r} already has fake quantization on its weight")
            if parametrize.is_parametrized(module, "weight"):
                masked += any(type(p).__name__ == "Mask" for p in module.parametrizations["weight"])
            w = module.weight.detach()
            parametrize.register_parametrization(module, "weight", self.fake_quant(module))
            error = relative_error(w, module.weight.detach())
            rows.append(self.row(name, module, before, started=started, error=error, planned_bits=self.bits,
                                 group_size=self.group_size, symmetric=self.symmetric, fake_quant=True))
        notes = (f"{masked} module(s) carry a pruning mask: the fake quantization applies to the masked weight",) if masked else ()
        return self.report(rows, notes=notes)

    def step(self, model: nn.Module, ctx: Context) -> None:
        """Nothing to update: the grid is recomputed from the weight at every forward."""

    def finalize(self, model: nn.Module, ctx: Context) -> Report:
        """Replace every fake-quantized layer by a ``QuantLinear`` (or, with ``storage="sparse"``, a
        ``SparseQuantLinear``) holding the same codes."""
        rows: list[ModuleRow] = []
        try:
            chosen = [(n, m, get_fake_quant(m)) for n, m in self.select(model)]
        except TargetError:  # nothing of ours left (e.g. finalized already)
            chosen = []
        for name, module, fq in chosen:
            if fq is None:
                continue
            with ctx.working_on(name, module, in_place=False):  # a module swap: undone for free
                started, before = time.perf_counter(), self.measure(module)
                value = pre_quant_weight(module, name)
                codes, scale, zero = fq.grid(value)
                new, stored = quantized_layer(codes, scale, zero, bits=fq.bits, group_size=fq.group_size,
                                              bias=getattr(module, "bias", None), weight_dtype=value.dtype,
                                              sparse=self.storage == "sparse")
                rows_value = value.t() if fq.transposed else value
                error = relative_error(rows_value, dequantize(codes, scale, zero, group_size=fq.group_size))
                replace_module_(model, name, new)
                rows.append(self.row(name, new, before, started=started, error=error, group_size=new.group_size,
                                     symmetric=fq.symmetric, kernel=new.kernel, prefill=new.prefill_kernel, storage=stored))
        return self.report(rows, modified=bool(rows))
