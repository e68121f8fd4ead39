"""Sparsity schedules: plain functions of the training step, and a typed bundle of their settings.

All three rise from ``initial`` to ``final`` and never fall, so masks computed from them only
ever prune more. Between ``begin_step`` and ``end_step`` the sparsity changes only every
``frequency`` steps (Zhu & Gupta's Δt) and reaches ``final`` at ``end_step``:

* ``constant``: ``initial`` before ``begin_step``, ``final`` from it on (one-shot pruning at a
  chosen step);
* ``linear``: a straight line;
* ``cubic``: gradual magnitude pruning (Zhu & Gupta, 2017),
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3``: fast at first, while the network
  still has redundant weights, slow near the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from .._validate import check_choice, check_range, fail

__all__ = ["constant", "linear", "cubic", "SCHEDULES", "Schedule", "check_schedule"]


def _progress(step: int, begin: int, end: int, frequency: int) -> float:
    # Fraction of the ramp done at `step`, held constant between updates every `frequency` steps.
    if step < begin:
        return 0.0
    if step >= end:
        return 1.0
    last_update = begin + (step - begin) // frequency * frequency
    return (last_update - begin) / (end - begin)


def _ends(p: float, initial: float, final: float, value: float) -> float:
    # The ends exactly (no rounding) and the value kept inside them.
    if p <= 0.0:
        return initial
    if p >= 1.0:
        return final
    return min(max(value, initial), final)


def constant(step: int, *, initial: float, final: float, begin_step: int, end_step: int = 0, frequency: int = 1) -> float:
    """``initial`` before ``begin_step``, ``final`` from it on (``end_step``/``frequency`` unused).

    Example:
        >>> [constant(t, initial=0.0, final=0.5, begin_step=2) for t in range(4)]
        [0.0, 0.0, 0.5, 0.5]
    """
    return final if step >= begin_step else initial


def linear(step: int, *, initial: float, final: float, begin_step: int, end_step: int, frequency: int = 1) -> float:
    """A straight line from ``initial`` at ``begin_step`` to ``final`` at ``end_step``.

    Example:
        >>> [linear(t, initial=0.0, final=0.5, begin_step=0, end_step=4) for t in range(6)]
        [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    """
    p = _progress(step, begin_step, end_step, frequency)
    return _ends(p, initial, final, initial + (final - initial) * p)


def cubic(step: int, *, initial: float, final: float, begin_step: int, end_step: int, frequency: int = 1) -> float:
    """Zhu & Gupta's gradual pruning: ``final + (initial - final) * (1 - progress)^3``.

    Example:
        >>> [round(cubic(t, initial=0.0, final=0.8, begin_step=0, end_step=4, frequency=2), 3) for t in range(5)]
        [0.0, 0.0, 0.7, 0.7, 0.8]
    """
    p = _progress(step, begin_step, end_step, frequency)
    return _ends(p, initial, final, final + (initial - final) * (1.0 - p) ** 3)


SCHEDULES: dict[str, Callable[..., float]] = {"constant": constant, "linear": linear, "cubic": cubic}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A sparsity schedule as plain data; call it with a step to get the sparsity.

    Args:
        kind: ``"constant"``, ``"linear"`` or ``"cubic"``.
        final: Sparsity at and after ``end_step``, in [0, 1).
        initial: Sparsity before ``begin_step``, in [0, ``final``].
        begin_step: First step of the ramp (>= 0).
        end_step: Step where ``final`` is reached (> ``begin_step``; ``constant`` ignores it).
        frequency: Steps between updates (>= 1).

    Raises:
        ConfigError: A value out of range.

    Example:
        >>> s = Schedule("cubic", final=0.9, begin_step=10, end_step=110, frequency=10)
        >>> s(0), round(s(60), 4), s(110)
        (0.0, 0.7875, 0.9)
    """

    kind: Literal["constant", "linear", "cubic"]
    final: float
    initial: float = 0.0
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 1

    def __post_init__(self) -> None:
        check_schedule(
            "Schedule", self.kind, initial=self.initial, final=self.final, begin_step=self.begin_step,
            end_step=self.end_step, frequency=self.frequency,
        )

    def __call__(self, step: int) -> float:
        """The sparsity at ``step``."""
        return SCHEDULES[self.kind](
            step, initial=self.initial, final=self.final, begin_step=self.begin_step, end_step=self.end_step,
            frequency=self.frequency,
        )


def check_schedule(owner: str, kind: str, *, initial: float, final: float, begin_step: int, end_step: int, frequency: int,
                   names: dict[str, str] | None = None) -> None:
    """Raise ConfigError unless the settings describe a valid schedule; ``names`` renames fields in messages."""
    n = {f: f for f in ("kind", "initial", "final", "begin_step", "end_step", "frequency")}
    n.update(names or {})
    check_choice(owner, n["kind"], kind, SCHEDULES)
    for field, value in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
        if not isinstance(value, int) or isinstance(value, bool):
            fail(owner, n[field], "an integer", value)
    for field, value in (("initial", initial), ("final", final)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail(owner, n[field], "a number", value)
    check_range(owner, n["final"], final, 0.0, 1.0, hi_open=True)
    check_range(owner, n["initial"], initial, 0.0, final)
    check_range(owner, n["begin_step"], begin_step, 0)
    check_range(owner, n["frequency"], frequency, 1)
    if kind != "constant" and end_step <= begin_step:
        fail(owner, n["end_step"], f"> begin_step={begin_step} for a {kind} schedule", end_step)
