"""Wanda: prune by weight magnitude times input activation norm (registered as ``"wanda"``).

Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models": the
importance of ``W_ij`` is ``|W_ij| * ||X_j||_2``, the norm of input channel ``j`` over every
calibration token, compared within each output row. No weight update, no Hessian: one sum of
squares per input channel, and (propagating the dense outputs) one forward over the calibration
data.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._report import ModuleRow
from .._validate import check_range
from ..calibration import InputStats
from ._calibrated import CalibratedPrune
from ._mask import from_rows, get_mask, rows_view, stored_weight
from ._obs import relative_output_error
from ._owl import wanda_scores
from ._refit import refit_kept

__all__ = ["Wanda", "wanda_scores"]


@dataclasses.dataclass
class Wanda(CalibratedPrune):
    """Prune the weights of lowest ``|w| * ||x||``, per output row by default; unstructured or N:M.

    Fields are :class:`~llmslim.prune.CalibratedPrune`'s (``sparsity``, ``pattern``,
    ``remainder``, ``storage``, ``value_dtype``, ``blocks``, ``propagate``, ``sequential``,
    ``allocation``, ``owl_lambda``, ``owl_m``), plus:

    Args:
        scope: ``"row"`` (the default, Wanda's comparison group: every output row prunes its
            share) or ``"layer"``.
        propagate: ``"original"`` (the default here: the next block is calibrated on the dense
            outputs, so the sweep is one forward over the calibration data) or ``"compressed"``
            (on the pruned outputs: one more block forward per block). Wanda's scores need only
            activation norms, and on SmolLM2 the dense outputs served as well (see
            ``benchmarks/prune_quality.py``'s ablation).

    ``allocation="owl"`` (:class:`~llmslim.prune.CalibratedPrune`) gives blocks whose scores hold
    more outliers a lower sparsity; ``refit`` re-fits the kept weights to the dense outputs (then
    ``damping``, the fraction of ``X^T X``'s mean diagonal added to it, in [0, 100], applies, and
    rows report ``error``). Report rows give ``target_sparsity``
    (the block's under OWL) and ``achieved_sparsity``; without ``refit``, ``error`` is left empty
    (it would need ``X^T X``, which Wanda then does not collect).

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> from llmslim.prune import Wanda
        >>> model = models.tiny("llama")
        >>> batches = [{"input_ids": torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
        >>> report = ls.compress_(model, Wanda(sparsity=0.5, ignore=["lm_head"]), calibration=batches, progress=False)
        >>> {round(r.info["achieved_sparsity"], 3) for r in report.children[0].rows}
        {0.5}
        >>> Wanda(pattern="2:4", allocation="owl")
        Traceback (most recent call last):
        ...
        llmslim.errors.ConfigError: wanda: allocation must be 'uniform' with an N:M pattern, which fixes every layer's sparsity (got 'owl')
    """

    scope: Literal["layer", "row", "global"] = "row"
    propagate: Literal["compressed", "original"] = "original"
    damping: float = 0.01

    strategy_overrides: ClassVar[dict[str, Any]] = {
        **CalibratedPrune.strategy_overrides,
        "max_layer_sparsity": [None, None, 1.0, 0.99],
    }

    def validate(self) -> None:
        super().validate()
        check_range(self.label, "damping", self.damping, 0.0, 100.0)

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"sqsum", "xtx"} if self.refit else {"sqsum"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow:
        start = time.perf_counter()
        dense = rows_view(module, module.weight.detach()).float().clone() if self.refit else None
        row = self.mask_module_(name, module, ctx, wanda_scores(module, stats.channel_norms()),
                                sparsity=self.allocated_sparsity(name, ctx))
        if dense is not None:
            # the mask stays; the kept weights move to the least-squares fit of the dense outputs
            hessian = stats.hessian().to(dense.device)
            keep = rows_view(module, get_mask(module).mask)  # type: ignore[union-attr]
            shape = module.weight.shape
            fitted = refit_kept(dense, dense * keep, keep, hessian, damping=self.damping, iterations=self.refit)
            stored = stored_weight(module)
            with torch.no_grad():
                stored.copy_(from_rows(module, fitted, shape).to(stored.dtype))
            row = dataclasses.replace(row, error=relative_output_error(dense, fitted, hessian),
                                      info={**row.info, "refit": self.refit, "damping": self.damping})
        return dataclasses.replace(row, seconds=time.perf_counter() - start)
