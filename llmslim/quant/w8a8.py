"""The ``w8a8`` pass: int8 weights with dynamic per-token int8 activations, data-free."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from .._context import Context
from .._pass import PassBase
from .._report import Report
from .._targets import Target, replace_module_
from ._functional import relative_error
from ._linear import float_weight
from ._w8a8 import Int8DynamicLinear

__all__ = ["W8A8"]


@dataclasses.dataclass
class W8A8(PassBase):
    """Swap linear layers for :class:`~llmslim.quant.Int8DynamicLinear`: int8 weights, int8 activations.

    Weights are rounded once to int8 with one scale per output channel (symmetric); every forward
    rounds each token's activations to int8 with that token's own scale and multiplies the codes
    in an int8 GEMM (oneDNN on CPU, ``torch._int_mm`` under ``torch.compile`` and on CUDA). The
    numerics are int8 x int8 at every token count: no silent switch to float or weight-only
    kernels. Fast for prefill and batches (an int8 GEMM instead of a float one); for one-token
    decoding prefer weight-only int8/int4 (``rtn``, ``gptq``): whole-model decoding measured
    slower than float32 here (benchmarks/quant_speed.py).
    Activation outliers hurt per-token rounding: run :class:`~llmslim.quant.SmoothQuant` first
    on LLMs. Exact zeros stay zero (a pruned model keeps its sparsity). Data-free.

    Args:
        targets / ignore / name: As :class:`~llmslim.PassBase`; the ``lm_head`` is ignored by
            default (the layer most sensitive to quantization).

    Raises:
        ConfigError: A bad setting.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> report = ls.compress_(model, W8A8(), progress=False)
        >>> row = report.all_rows[0]
        >>> row.kind, row.bits, row.info["kernel"] in ("onednn_qlinear", "int_mm", "int8_emulated")
        ('Int8DynamicLinear', 8.0, True)
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    ignore: tuple[Target, ...] = ("lm_head",)

    produces: ClassVar[frozenset[str]] = frozenset({"packed"})
    rejects_after: ClassVar[Mapping[str, str]] = {"packed": "the weights are already quantized"}
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")

    def declares(self) -> dict[str, float]:
        """Every reported module stores 8 bits per weight."""
        return {"bits": 8.0}

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        rows = []
        for name, module in self.modules(model, ctx):
            started, before = time.perf_counter(), self.measure(module)
            w, _ = float_weight(module)
            new = Int8DynamicLinear.from_float(module)
            error = relative_error(w, new.dequantize(torch.float32))
            replace_module_(model, name, new)
            rows.append(self.row(name, new, before, started=started, error=error, group_size=None, symmetric=True,
                                 kernel=new.kernel, prefill=new.prefill_kernel, activations="int8 per token, dynamic"))
        notes = ("activations are rounded to int8 per token at run time; error is the weight's relative error",)
        return self.report(rows, notes=notes)
