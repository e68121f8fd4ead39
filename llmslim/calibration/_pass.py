"""``CalibrationPass``: the base of passes that learn from data, and shared sweeps.

A subclass says which statistics it needs per module (``statistics``) and how it rewrites a
module from them (``solve``); :func:`calibrate` does the rest. Consecutive calibration passes
in a :class:`~llmslim.PassManager` with the same sweep settings share one sweep (:class:`Sweep`):
the calibration data is captured once and each block is visited once, each pass solving in turn
on the block as the passes before it left it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

from torch import nn

from .._context import Context
from .._pass import PassBase, pass_name
from .._report import ModuleRow, Report
from ._engine import calibrate
from ._stats import InputStats

__all__ = ["CalibrationPass", "Sweep", "sweeps"]


@dataclasses.dataclass
class CalibrationPass(PassBase):
    """Base of data-driven passes run by the calibration engine.

    Args:
        blocks: Qualified name of the block list (found automatically when ``None``).
        propagate: Feed each next block the ``"compressed"`` (default) or ``"original"`` outputs.

    Example:
        >>> import dataclasses, torch
        >>> import llmslim as ls
        >>> from llmslim.calibration import CalibrationPass
        >>> @dataclasses.dataclass
        ... class Norms(CalibrationPass):
        ...     def statistics(self, name, module):
        ...         return {"sqsum"}
        ...     def solve(self, name, module, stats, ctx):
        ...         print(name, stats.n)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = ls.compress_(model, Norms(), calibration=[torch.ones(3, 4)], progress=False)
        0 3
    """

    blocks: str | None = None
    propagate: Literal["compressed", "original"] = "compressed"

    requires: ClassVar[frozenset[str]] = frozenset({"calibration"})
    sequential: ClassVar[bool] = False  # true-sequential groups within a block (override per pass)
    # llmslim.testing draws configs from these (a block-list name is model-specific)
    strategy_overrides: ClassVar[dict[str, Any]] = {"blocks": [None]}

    def statistics(self, name: str, module: nn.Module) -> Iterable[str]:
        """Statistic kinds needed for one module: ``"xtx"``, ``"sqsum"``, ``"absmax"``."""
        raise NotImplementedError(f"{type(self).__name__} must implement statistics(name, module)")

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow | None:
        """Rewrite ``module`` from its input statistics (do not modify ``stats``: it may be shared)."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve(name, module, stats, ctx)")

    def sweep_key(self) -> tuple[Any, ...]:
        """Passes with equal keys can share one sweep."""
        return (self.blocks, self.propagate)

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        result = calibrate(model, ctx, [self], blocks=self.blocks, propagate=self.propagate, weights=ctx.weights,
                           after_block=ctx.after_block, desc=self.label)
        return self.report(result.rows[0], notes=result.notes())


class _Tracked:
    """Forwards a pass's solver methods, noting which pass is solving (for error messages)."""

    def __init__(self, p: CalibrationPass, sweep: Sweep) -> None:
        self.p, self.sweep = p, sweep
        self.sequential = p.sequential
        self.edits_in_place = p.edits_in_place

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        self.sweep.current = self.p
        return self.p.select(model)

    def statistics(self, name: str, module: nn.Module) -> Iterable[str]:
        return self.p.statistics(name, module)

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow | None:
        self.sweep.current = self.p
        return self.p.solve(name, module, stats, ctx)


class Sweep:
    """Several calibration passes run in one sweep; the manager reports each pass on its own."""

    def __init__(self, passes: Sequence[CalibrationPass]) -> None:
        self.passes = tuple(passes)
        self.current: CalibrationPass | None = None
        self.requires = frozenset().union(*(p.requires for p in passes))

    @property
    def name(self) -> str:
        """The failing pass's name while one is solving (so errors name it), else all names."""
        others = [pass_name(p) for p in self.passes if p is not self.current]
        if self.current is not None:
            return f"{pass_name(self.current)} (shared calibration sweep with {', '.join(map(repr, others))})"
        return " + ".join(pass_name(p) for p in self.passes)

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        first = self.passes[0]
        result = calibrate(
            model, ctx, [_Tracked(p, self) for p in self.passes], blocks=first.blocks, propagate=first.propagate,
            weights=ctx.weights, after_block=ctx.after_block, desc=" + ".join(p.label for p in self.passes),
        )
        self.current = None
        shared = f"shared calibration sweep: {', '.join(p.label for p in self.passes)}"
        children = tuple(p.report(rows, notes=(*result.notes(), shared)) for p, rows in zip(self.passes, result.rows))
        return Report(self.name, children=children, modified=any(c.modified for c in children))


def sweeps(passes: Sequence[Any]) -> list[Any]:
    """Group runs of consecutive calibration passes with equal sweep keys into :class:`Sweep` units."""
    units: list[Any] = []
    run: list[CalibrationPass] = []
    for p in [*passes, None]:
        if isinstance(p, CalibrationPass) and (not run or p.sweep_key() == run[0].sweep_key()):
            run.append(p)
            continue
        if len(run) > 1:
            units.append(Sweep(run))
        else:
            units.extend(run)
        run = [p] if isinstance(p, CalibrationPass) else []
        if p is not None and not isinstance(p, CalibrationPass):
            units.append(p)
    return units
