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
from .._report import ModuleRow, Report
from .._validate import check_range, fail
from ..calibration import InputStats
from ._calibrated import CalibratedPrune
from ._mask import from_rows, rows_view
from ._owl import allocate

__all__ = ["Wanda", "wanda_scores"]


def wanda_scores(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` shaped like ``module.weight``, from per-input-channel norms.

    Example:
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[3.0, -1.0]]))
        >>> wanda_scores(layer, torch.tensor([1.0, 10.0])).tolist()
        [[3.0, 10.0]]
    """
    weight = module.weight.detach()
    rows = rows_view(module, weight).abs().float() * norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)
    return from_rows(module, rows, weight.shape)


@dataclasses.dataclass
class Wanda(CalibratedPrune):
    """Prune the weights of lowest ``|w| * ||x||``, per output row by default; unstructured or N:M.

    Fields are :class:`~llmslim.prune.CalibratedPrune`'s (``sparsity``, ``pattern``,
    ``remainder``, ``storage``, ``value_dtype``, ``blocks``, ``propagate``, ``sequential``), plus:

    Args:
        scope: ``"row"`` (the default, Wanda's comparison group: every output row prunes its
            share) or ``"layer"``.
        propagate: ``"original"`` (the default here: the next block is calibrated on the dense
            outputs, so the sweep is one forward over the calibration data) or ``"compressed"``
            (on the pruned outputs: one more block forward per block). Wanda's scores need only
            activation norms, and on SmolLM2 the dense outputs served as well (see
            ``benchmarks/prune_quality.py``'s ablation).
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"``: outlier-weighted
            layer-wise sparsity, blocks whose scores hold more outliers prune less, the mean
            kept at ``sparsity`` (one extra read-only sweep first). Unstructured only.
        owl_lambda: OWL's spread: block sparsities span ``sparsity +- owl_lambda``, in [0, 0.5].
        owl_m: OWL's outlier threshold: scores above ``owl_m`` times their block's mean, > 0.

    ``max_layer_sparsity`` caps OWL's block sparsities. Report rows give ``target_sparsity``
    (the block's under OWL) and ``achieved_sparsity``; ``error`` is left empty (it would need
    ``X^T X``, which Wanda does not collect).

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
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    strategy_overrides: ClassVar[dict[str, Any]] = {
        **CalibratedPrune.strategy_overrides,
        "allocation": ["uniform", "uniform", "owl"],
        "owl_lambda": {"min_value": 0.0, "max_value": 0.5},
        "owl_m": {"min_value": 0.5, "max_value": 10.0},
        "max_layer_sparsity": [None, None, 1.0, 0.99],
    }

    def validate(self) -> None:
        super().validate()
        check_range(self.label, "owl_lambda", self.owl_lambda, 0.0, 0.5)
        check_range(self.label, "owl_m", self.owl_m, 0.0, None, lo_open=True)
        if self.allocation == "owl" and self.n_m is not None:
            fail(self.label, "allocation", "'uniform' with an N:M pattern, which fixes every layer's sparsity", self.allocation)

    def declares(self) -> dict[str, Any]:
        if self.allocation == "owl":  # sparsity varies by block; the mean is the target
            return {}
        return super().declares()

    def sweep_key(self) -> tuple[Any, ...]:
        # OWL needs a sweep of its own first, so it cannot join a shared one
        return (*super().sweep_key(), id(self)) if self.allocation == "owl" else super().sweep_key()

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"sqsum"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow:
        start = time.perf_counter()
        allocated = getattr(self, "_allocated", {})
        row = self.mask_module_(name, module, ctx, wanda_scores(module, stats.channel_norms()), sparsity=allocated.get(name))
        return dataclasses.replace(row, seconds=time.perf_counter() - start)

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Sweep the calibration data and mask every target; with OWL, measure outliers first."""
        if self.allocation != "owl":
            return super().apply(model, ctx)

        def score(name: str, module: nn.Module, stats: InputStats) -> torch.Tensor:
            return wanda_scores(module, stats.channel_norms())

        allocated, note = allocate(model, ctx, self, score, target=self.sparsity_at(ctx.step), lam=self.owl_lambda,
                                   m=self.owl_m, cap=self.max_layer_sparsity)
        self._allocated = allocated  # read by solve(); not configuration, so not a field
        try:
            report = super().apply(model, ctx)
        finally:
            del self._allocated
        return dataclasses.replace(report, notes=(*report.notes, note))
