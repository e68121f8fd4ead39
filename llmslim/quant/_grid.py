"""The weight-grid fields the integer quantizers share (``rtn``, ``gptq``, ``qat``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from .._targets import Target
from .._validate import fail

__all__ = ["GridFields"]


@dataclasses.dataclass
class GridFields:
    """Mixin for a pass's dataclass: put it before the pass base (``class RTN(GridFields, PassBase)``).

    Fields: ``targets`` (linear layers, GPT-2's ``Conv1D`` included), ``ignore`` (``lm_head``, the
    layer most sensitive to quantization), ``bits``, ``group_size`` (``None``: one scale per output
    channel), ``symmetric`` and ``scale_dtype``; :meth:`validate` checks ``group_size``.
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    ignore: tuple[Target, ...] = ("lm_head",)
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            fail(self.label, "group_size", "a positive integer or None", self.group_size)  # type: ignore[attr-defined]
