"""``CalibratedPrune``: a pruning pass whose masks come from a calibration sweep (Wanda, SparseGPT).

It is both a :class:`~llmslim.calibration.CalibrationPass` (the engine runs the model block by
block and calls ``solve`` per module with its input statistics) and a
:class:`~llmslim.prune.PruneBase` (masks as parametrizations, patterns, scopes, ``finalize`` to
dense zeros or compressed storage, reports). The engine's ``apply`` runs; the prune side brings
everything after the scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from .._context import Context
from .._report import Report
from .._targets import Target
from .._validate import fail
from ..calibration import CalibrationPass
from ._base import _DEFAULT_TARGETS, PruneBase

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

    Raises:
        ConfigError: ``scope="global"`` (scores arrive one block at a time, each after the blocks
            before it were pruned, so no single threshold can be drawn) or a ``schedule`` (these
            passes prune once, in ``apply``).
    """

    targets: tuple[Target, ...] = _DEFAULT_TARGETS  # PruneBase's, not CalibrationPass's
    sequential: bool = False

    accepts = ("Linear", "Conv1D", "Conv2d")  # the engine's statistics cover these inputs
    strategy_overrides: ClassVar[dict[str, Any]] = {
        **PruneBase.strategy_overrides,
        **CalibrationPass.strategy_overrides,
        "scope": ["layer", "row"],
        "schedule": [None],
        "max_layer_sparsity": [None],
    }

    def validate(self) -> None:
        super().validate()
        if self.scope == "global":
            fail(self.label, "scope", "'layer' or 'row' (calibrated scores arrive one block at a time)", self.scope)
        if self.schedule is not None:
            fail(self.label, "schedule", "None (calibration passes prune once, in apply)", self.schedule)

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Run the calibration sweep (``solve`` per target); an N:M row length that does not split
        fails here, before the first block runs."""
        self._check_groups(self.select(model))
        return super().apply(model, ctx)
