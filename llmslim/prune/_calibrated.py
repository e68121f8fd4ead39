"""``CalibratedPrune``: a pruning pass whose masks come from a calibration sweep (Wanda, SparseGPT).

It is both a :class:`~llmslim.calibration.CalibrationPass` (the engine runs the model block by
block and calls ``solve`` per module with its input statistics) and a
:class:`~llmslim.prune.PruneBase` (masks as parametrizations, patterns, scopes, ``finalize`` to
dense zeros or compressed storage, reports). The engine's ``apply`` runs; the prune side brings
everything after the scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._report import Report
from .._targets import Target
from .._validate import check_range, fail
from ..calibration import CalibrationPass, InputStats
from ._base import _DEFAULT_TARGETS, PruneBase
from ._owl import allocate, wanda_scores

__all__ = ["CalibratedPrune"]


@dataclasses.dataclass
class CalibratedPrune(CalibrationPass, PruneBase):
    """Base of one-shot pruning passes that learn from calibration data.

    Fields are :class:`~llmslim.prune.PruneBase`'s (``sparsity``, ``pattern``, ``scope``,
    ``remainder``, ``storage``, ``value_dtype``) and
    :class:`~llmslim.calibration.CalibrationPass`'s (``blocks``, ``propagate``), plus:

    Args:
        sequential: Solve a block's layers one input group at a time (q/k/v, then o, then
            gate/up, then down), each group's statistics taken after the groups before it were
            pruned; costs one block forward per group.
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"``: outlier-weighted
            layer-wise sparsity (Yin et al., 2023): blocks whose Wanda scores ``|w| * ||x||``
            hold more outliers prune less, the mean kept at ``sparsity`` (one extra read-only
            sweep first). Unstructured only; ``max_layer_sparsity`` caps the block sparsities.
        owl_lambda: OWL's spread: block sparsities span ``sparsity +- owl_lambda``, in [0, 0.5].
        owl_m: OWL's outlier threshold: scores above ``owl_m`` times their block's mean, > 0.
        refit: Conjugate-gradient iterations, in [0, 1000], that re-fit each layer's kept weights
            to its dense outputs on the calibration inputs once its mask is chosen (least
            squares on ``X^T X``, :func:`~llmslim.prune.refit_kept`); 0 (the default) leaves
            the method's own weights. About 10 reach the optimum; costs the ``X^T X`` statistics
            (Wanda) and ten products with ``H`` per layer.

    Raises:
        ConfigError: ``scope="global"`` (scores arrive one block at a time, each after the blocks
            before it were pruned, so no single threshold can be drawn), a ``schedule`` (these
            passes prune once, in ``apply``), or ``allocation="owl"`` with an N:M pattern.

    Example:
        >>> from llmslim.prune import SparseGPT
        >>> SparseGPT(pattern="2:4", allocation="owl")
        Traceback (most recent call last):
        ...
        llmslim.errors.ConfigError: sparsegpt: allocation must be 'uniform' with an N:M pattern, which fixes every layer's sparsity (got 'owl')
    """

    targets: tuple[Target, ...] = _DEFAULT_TARGETS  # PruneBase's, not CalibrationPass's
    sequential: bool = False
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    refit: int = 0

    accepts = ("Linear", "Conv1D", "Conv2d")  # the engine's statistics cover these inputs
    strategy_overrides: ClassVar[dict[str, Any]] = {
        **PruneBase.strategy_overrides,
        **CalibrationPass.strategy_overrides,
        "scope": ["layer", "row"],
        "schedule": [None],
        "max_layer_sparsity": [None],
        "allocation": ["uniform", "uniform", "owl"],
        "owl_lambda": {"min_value": 0.0, "max_value": 0.5},
        "owl_m": {"min_value": 0.5, "max_value": 10.0},
        "refit": [0, 0, 3],
    }

    def validate(self) -> None:
        super().validate()
        if self.scope == "global":
            fail(self.label, "scope", "'layer' or 'row' (calibrated scores arrive one block at a time)", self.scope)
        if self.schedule is not None:
            fail(self.label, "schedule", "None (calibration passes prune once, in apply)", self.schedule)
        check_range(self.label, "owl_lambda", self.owl_lambda, 0.0, 0.5)
        check_range(self.label, "owl_m", self.owl_m, 0.0, None, lo_open=True)
        if not 0 <= self.refit <= 1000:
            fail(self.label, "refit", "an integer in [0, 1000]", self.refit)
        if self.allocation == "owl" and self.n_m is not None:
            fail(self.label, "allocation", "'uniform' with an N:M pattern, which fixes every layer's sparsity", self.allocation)

    def declares(self) -> dict[str, Any]:
        if self.allocation == "owl":  # sparsity varies by block; the mean is the target
            return {}
        return super().declares()

    def sweep_key(self) -> tuple[Any, ...]:
        # OWL needs a sweep of its own first, so it cannot join a shared one
        return (*super().sweep_key(), id(self)) if self.allocation == "owl" else super().sweep_key()

    def allocated_sparsity(self, name: str, ctx: Context) -> float:
        """The sparsity of module ``name`` in this sweep: its block's under OWL, else the target."""
        return getattr(self, "_allocated", {}).get(name, self.sparsity_at(ctx.step))

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Run the calibration sweep (``solve`` per target); with OWL, measure outliers first. An
        N:M row length that does not split fails here, before the first block runs."""
        self._check_groups(self.select(model))
        if self.allocation != "owl":
            return super().apply(model, ctx)

        def score(name: str, module: nn.Module, stats: InputStats) -> torch.Tensor:
            return wanda_scores(module, stats.channel_norms())

        allocated, note = allocate(model, ctx, self, score, target=self.sparsity_at(ctx.step), lam=self.owl_lambda,
                                   m=self.owl_m, cap=self.max_layer_sparsity)
        self._allocated = allocated  # read by allocated_sparsity(); not configuration, so not a field
        try:
            report = super().apply(model, ctx)
        finally:
            del self._allocated
        return dataclasses.replace(report, notes=(*report.notes, note))
