"""The weight-grid fields the integer quantizers share (``rtn``, ``gptq``, ``qat``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from .._targets import Target
from .._validate import fail
from ._linear import SCALE_DTYPES

__all__ = ["GridFields"]


@dataclasses.dataclass
class GridFields:
    """Mixin for a pass's dataclass: put it before the pass base (``class RTN(GridFields, PassBase)``).

    Fields: ``targets`` (linear layers, GPT-2's ``Conv1D`` included), ``ignore`` (``lm_head``, the
    layer most sensitive to quantization), ``bits``, ``group_size`` (``None``: one scale per output
    channel), ``symmetric`` and ``scale_dtype`` (``"auto"``: float32 at 8 bits, bfloat16 below;
    see :meth:`scales_dtype`); :meth:`validate` checks ``group_size``.
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    ignore: tuple[Target, ...] = ("lm_head",)
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            fail(self.label, "group_size", "a positive integer or None", self.group_size)  # type: ignore[attr-defined]

    def scales_dtype(self) -> torch.dtype:
        """The dtype scales are stored in: ``scale_dtype``, or for ``"auto"`` float32 at 8 bits (a
        per-channel scale costs nothing next to the codes, and bfloat16's 8-bit mantissa cost 0.3%
        perplexity on SmolLM2-135M) and bfloat16 below (the CPU kernels' own dtype).

        Example:
            >>> from llmslim.quant import RTN
            >>> RTN(bits=8, group_size=None).scales_dtype(), RTN(bits=4).scales_dtype()
            (torch.float32, torch.bfloat16)
        """
        if self.scale_dtype == "auto":
            return torch.float32 if self.bits == 8 else torch.bfloat16
        return SCALE_DTYPES[self.scale_dtype]
