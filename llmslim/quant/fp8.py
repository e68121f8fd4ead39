"""The ``fp8`` pass: float8 e4m3 weights with one scale per output channel, data-free."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._pass import PassBase
from .._report import ModuleRow, Report
from .._targets import Target, replace_module_
from ._fp8 import FP8_SCALE_DTYPES, FP8Linear
from ._functional import relative_error
from ._linear import float_weight

__all__ = ["FP8"]


@dataclasses.dataclass
class FP8(PassBase):
    """Store each targeted layer's weight as float8 e4m3 codes with a scale per output channel.

    Every ``nn.Linear`` and transformers ``Conv1D`` becomes an :class:`~llmslim.quant.FP8Linear`:
    one byte per weight plus one scale per row, half of bfloat16. No calibration data. Zeros stay
    exactly zero. ``activations="dynamic"`` also rounds each token's activations to float8 (a scale
    per token, computed at run time), which lets CUDA devices of compute capability 8.9+ run
    ``torch._scaled_mm``'s float8 GEMM; ``"none"`` keeps weight-only numerics everywhere.

    Args:
        scale_dtype: ``"float32"`` (default) or ``"bfloat16"`` scales.
        activations: ``"none"`` (weight-only) or ``"dynamic"`` (float8 activations per token).
        clip: ``"mse"`` (default: per row, the lowest-error scale among eight alignments of the
            e4m3 grid; eight times the quantization work, seconds for SmolLM2: 0.998x float32
            perplexity against 1.022x) or ``"minmax"`` (``s = max|w| / 448``).
        targets / ignore / name: As :class:`~llmslim.PassBase`; ``lm_head`` is ignored by default.

    Raises:
        ConfigError: A bad setting.

    Example:
        >>> import llmslim as ls
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> report = ls.compress_(model, FP8(), progress=False)
        >>> row = report.all_rows[0]
        >>> row.kind, row.bits, row.info["kernel"], row.error < 0.04
        ('FP8Linear', 8.0, 'dequant_gemm_bf16', True)
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    ignore: tuple[Target, ...] = ("lm_head",)
    scale_dtype: Literal["float32", "bfloat16"] = "float32"
    activations: Literal["none", "dynamic"] = "none"
    clip: Literal["mse", "minmax"] = "mse"

    produces: ClassVar[frozenset[str]] = frozenset({"packed"})
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")

    def declares(self) -> dict[str, Any]:
        """Every reported module stores 8 bits per weight."""
        return {"bits": 8.0}

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        scale_dtype = FP8_SCALE_DTYPES[self.scale_dtype]
        rows: list[ModuleRow] = []
        for name, module in self.modules(model, ctx):
            started, before = time.perf_counter(), self.measure(module)
            w, _ = float_weight(module)
            new = FP8Linear.from_float(module, scale_dtype=scale_dtype, activations=self.activations, clip=self.clip)
            error = relative_error(w, new.dequantize(torch.float32))
            replace_module_(model, name, new)
            rows.append(self.row(name, new, before, started=started, error=error, group_size=None,
                                 activations=self.activations, kernel=new.kernel, prefill=new.prefill_kernel))
        notes = ()
        if any(r.info["kernel"] != "scaled_mm" for r in rows) and self.activations == "dynamic":
            notes = ("activations='dynamic' without a float8 GEMM on this device (CUDA 8.9+): emulated (same numerics, no speedup)",)
        return self.report(rows, notes=notes)
