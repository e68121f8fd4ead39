"""SparseGPT: one-shot pruning with Hessian-based error compensation (registered as ``"sparsegpt"``).

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot": each layer is pruned column block by column block, choosing the mask by the Optimal
Brain Surgeon saliency and updating the weights not yet visited so the layer's outputs on the
calibration inputs move as little as possible (:func:`~llmslim.prune.obs_prune`). The kept
weights change; the pruned ones are held at exactly zero by the prune package's mask.

With ``bits`` set, the kept weights are also quantized in the same sweep (the paper's joint
sparsification and quantization): each layer becomes a packed
:class:`~llmslim.quant.QuantLinear`, or with ``storage="compressed"`` a
:class:`~llmslim.quant.SparseQuantLinear` holding only the non-zero codes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._report import ModuleRow
from .._targets import replace_module_
from .._validate import check_range, fail
from ..calibration import InputStats
from ..errors import CalibrationError
from ..quant._linear import SCALE_DTYPES
from ._calibrated import CalibratedPrune
from ._mask import from_rows, get_mask, rows_view, set_mask_, stored_weight
from ._obs import ObsResult, QuantGrid, obs_prune

__all__ = ["SparseGPT"]


@dataclasses.dataclass
class SparseGPT(CalibratedPrune):
    """Prune with OBS error compensation from the inputs' Hessian; unstructured or N:M.

    Fields are :class:`~llmslim.prune.CalibratedPrune`'s (``sparsity``, ``pattern``,
    ``remainder``, ``storage``, ``value_dtype``, ``blocks``, ``propagate``, ``sequential``,
    ``allocation``, ``owl_lambda``, ``owl_m``), plus:

    Args:
        scope: ``"layer"`` (the default, the paper's adaptive mask selection: each block of
            columns prunes its share of the layer, lowest saliency across all rows) or
            ``"row"`` (each row prunes its share of every block).
        block_size: Columns solved together (the mask is chosen per block), >= 1; rounded up
            to a multiple of M for N:M patterns. 128 as in the paper.
        damping: Added to the Hessian's diagonal, as a fraction of its mean (0.01 = 1%), in
            [0, 100]. A Hessian that still cannot be factorised is retried with ten times more,
            and the row's ``info`` says so (``damping``, ``cholesky_retries``).
        bits: ``None`` (the default: prune only) or 2, 3, 4, 8: also quantize the kept weights in
            the same sweep, with the same error feedback. ``storage`` then picks the layer:
            ``"dense"`` a packed :class:`~llmslim.quant.QuantLinear` (zeros are zero-point
            codes; the CPU int4/int8 kernels), ``"compressed"`` a
            :class:`~llmslim.quant.SparseQuantLinear` (a bitmask or N:M indices plus the
            non-zero codes) where that is smaller. ``Linear`` and ``Conv1D`` targets only.
        group_size: Input columns per scale, or ``None`` for one per output row (with ``bits``).
        symmetric: Symmetric grid, or asymmetric with integer zero points (with ``bits``).
        scale_dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` scales (with ``bits``).

    Inputs that never fired on the calibration data (zero Hessian diagonal) have their weights
    pruned first (``info["dead_inputs"]``). Rows report ``target_sparsity``,
    ``achieved_sparsity``, ``pattern`` and, in ``error``, the layer's relative output error on
    its calibration inputs, ``||W X - W' X|| / ||W X||``, computed exactly from ``X^T X``.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> from llmslim.prune import SparseGPT
        >>> model = models.tiny("gpt2")   # Conv1D layers, weights stored [in, out]
        >>> batches = [{"input_ids": torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
        >>> report = ls.compress_(model, SparseGPT(pattern="2:4", ignore=["lm_head"]), calibration=batches, progress=False)
        >>> rows = report.children[0].rows
        >>> {r.info["achieved_sparsity"] for r in rows}, all(0 <= r.error < 1 for r in rows)
        ({0.5}, True)
    """

    block_size: int = 128
    damping: float = 0.01
    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    strategy_overrides: ClassVar[dict[str, Any]] = {
        **CalibratedPrune.strategy_overrides,
        "block_size": [128, 1, 3, 8, 16, 64],
        "damping": {"min_value": 0.0, "max_value": 1.0},
        "bits": [None, None, 4, 8, 3, 2],
        "group_size": [128, None, 3, 8, 32],
        "value_dtype": [None, None, "float16"],
    }

    def validate(self) -> None:
        super().validate()
        if self.block_size < 1:
            fail(self.label, "block_size", "an integer >= 1", self.block_size)
        check_range(self.label, "damping", self.damping, 0.0, 100.0)
        if self.group_size is not None and self.group_size < 1:
            fail(self.label, "group_size", "a positive integer or None", self.group_size)
        if self.bits is not None and self.value_dtype is not None:
            fail(self.label, "value_dtype", "None with bits set (the stored values are codes)", self.value_dtype)
        if self.bits is not None and self.refit:
            fail(self.label, "refit", "0 with bits set (the joint sweep fixes the kept weights)", self.refit)

    # With bits set the pass also packs the weights it pruned: later pruning passes are refused,
    # and only linear layers (what QuantLinear holds) can be targets.
    @property
    def produces(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"masks"} if self.bits is None else {"masks", "packed"})

    @property
    def accepts(self) -> tuple[str, ...]:  # type: ignore[override]
        return CalibratedPrune.accepts if self.bits is None else ("Linear", "Conv1D")

    def declares(self) -> dict[str, Any]:
        props = super().declares()
        return props if self.bits is None else {**props, "bits": float(self.bits)}

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"xtx"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow:
        start, before = time.perf_counter(), self.measure(module)
        self._check_groups([(name, module)])
        target = self.allocated_sparsity(name, ctx)
        weight = module.weight.detach()  # as the forward sees it: zero where already masked
        mask = get_mask(module)
        pruned = None if mask is None else ~rows_view(module, mask.mask)
        try:
            out = obs_prune(rows_view(module, weight), stats.hessian().to(weight.device), sparsity=target, n_m=self.n_m,
                            scope=self.scope, block_size=self.block_size, damping=self.damping,
                            remainder=self.remainder, pruned=pruned, quant=self._grid(), refit=self.refit)
        except CalibrationError as exc:
            raise CalibrationError(f"{self.label}: module {name!r}: {exc}") from exc
        if self.bits is not None:
            return self._quantized(name, module, out, target, before, start, ctx)
        # SparseGPT picks its mask inside the solve, block by block, so it hands over the mask
        # itself (set_mask_) rather than scores: the compensated weights go into the stored
        # original, then the mask holds the pruned ones at exactly zero.
        stored = stored_weight(module)
        with torch.no_grad():
            stored.copy_(from_rows(module, out.weight, weight.shape).to(stored.dtype))
        set_mask_(module, from_rows(module, out.keep, weight.shape), target, name)
        info = self._info(module, target, get_mask(module).mask)  # type: ignore[union-attr]
        info.update(block_size=self.block_size, damping=out.damping, cholesky_retries=out.retries, dead_inputs=out.dead,
                    refit=self.refit)
        return self.row(name, module, before, started=start, error=out.error, **info)

    def _grid(self) -> QuantGrid | None:
        if self.bits is None:
            return None
        return QuantGrid(self.bits, self.group_size, self.symmetric, SCALE_DTYPES[self.scale_dtype])

    def _quantized(self, name: str, module: nn.Module, out: ObsResult, target: float, before: Any, start: float,
                   ctx: Context) -> ModuleRow:
        # Joint mode: the layer becomes packed codes (the mask is in them: zero-point codes)
        from ..quant._sparse import quantized_layer  # here: llmslim.quant imports this package

        if ctx.model is None:
            raise RuntimeError("SparseGPT.solve runs inside the calibration engine, which sets ctx.model")
        new, stored = quantized_layer(out.codes, out.scale, out.zero, bits=self.bits, group_size=self.group_size,  # type: ignore[arg-type]
                                      bias=getattr(module, "bias", None), weight_dtype=module.weight.dtype,
                                      sparse=self.storage == "compressed")
        replace_module_(ctx.model, name, new)
        info = self._info(new, target, out.keep)
        info.update(block_size=self.block_size, damping=out.damping, cholesky_retries=out.retries, dead_inputs=out.dead,
                    group_size=self.group_size, symmetric=self.symmetric, storage=stored, kernel=new.kernel)
        return self.row(name, new, before, started=start, error=out.error, **info)
